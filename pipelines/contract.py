"""The row contract every kind's parser keeps (key, source, row, <its columns>, error), as pure
DataFrame -> DataFrame transforms: raw file contents to records with a reason for every bad one,
and the rejection of repeated keys."""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


def reject_duplicate_keys(parsed: DataFrame, existing: DataFrame | None) -> DataFrame:
    """Every repeat of a key (after its first by source file and row) and, in append mode, every
    key already in the output tables gets a `duplicate key` error."""
    ok, bad = parsed.where(F.col("error").isNull()), parsed.where(F.col("error").isNotNull())
    window = Window.partitionBy("key").orderBy("source", "row")
    first = F.first(F.struct("source", "row")).over(window)
    where = F.concat(first["source"], F.when(first["row"].isNotNull(), F.concat(F.lit(" line "), first["row"])).otherwise(F.lit("")))
    ok = ok.withColumn("error", F.when(F.row_number().over(window) > 1,
                                       F.concat(F.lit("duplicate key "), F.col("key"), F.lit(" (first seen in "), where, F.lit(")"))))
    if existing is not None:
        known = existing.select("key", F.col("table").alias("_in")).dropDuplicates(["key"])
        ok = ok.join(F.broadcast(known), "key", "left").withColumn(
            "error", F.coalesce("error", F.when(F.col("_in").isNotNull(), F.concat(
                F.lit("duplicate key "), F.col("key"), F.lit(" already in "), F.col("_in"), F.lit(" (data.mode=merge updates keys)"))))
        ).drop("_in")
    return ok.unionByName(bad.select(*ok.columns))


def parse_files(files: DataFrame, root: str, fmt: str, encoding: str, key_column: str, schema: str, convert) -> DataFrame:
    """Raw files -> one row per record: key, source, row, <schema>, error. `convert(record)`
    returns the kind's columns or raises records.Invalid with the reason. Without a key column
    the key is <file relative to the landing root>:<line>."""
    import pandas as pd

    from pipelines.images import _relative_key
    from pipelines.records import Invalid, read_records, text

    columns = ["key", "source", "row", *[c.split()[0] for c in schema.split(", ")], "error"]
    where = "row" if fmt == "parquet" else "line"

    def run(batches):
        for batch in batches:
            out = []
            for path, content in zip(batch["path"], batch["content"]):
                relative = _relative_key(path, root)
                for row, record, reason in read_records(content, fmt, encoding):
                    item = {"key": f"{relative}:{row}" if row else relative, "source": path, "row": row, "error": reason}
                    if record is not None:
                        try:
                            if key_column:
                                item["key"] = text(record, key_column)
                            item.update(convert(record))
                        except Invalid as exc:
                            item["error"] = f"{where} {row}: {exc}"
                    out.append(item)
            # object columns: a missing value stays None (null), never NaN
            yield pd.DataFrame({c: pd.Series([item.get(c) for item in out], dtype=object) for c in columns})

    return files.select("path", "content").mapInPandas(
        run, f"key string, source string, row long, {schema}, error string")
