"""The prepare job for every data kind: raw files under paths.landing -> validated, versioned
Delta tables. The contract handling is the same for every kind and lives here:

- the kind's parser yields one row per input record with `key, source, row, error` and its own
  columns; rows with an error, and every repeat of a key, go to `<name>_rejected` with the reason;
- input = accepted + rejected, exactly; above data.max_rejected_fraction the job fails after
  writing the rejects and before writing any output table;
- data.mode: overwrite; append (only source files no finished job took in, as listed in
  <name>_sources; a key already in the tables is rejected) or merge (the same new files, upserted
  by key: one overwrite commit per table, atomic on both Delta engines);
- fitted state (standardization statistics, vocabularies) comes from the train split only, is
  written as its own Delta table and is reused, not refitted, by append and merge;
- every commit carries the job id, kind, mode and source URIs in its metadata.

A kind is a module with: BASE (tables the accepted rows go to, named by their `split` column),
STATE (suffix of the fitted-state table or None), UNIT, parse(files, data, root, state),
assign_split(df, data), fit(accepted, data), state_rows(state), state_from_rows(pdf),
to_base(accepted, data, state), derive(tables, data, state) -> {suffix: DataFrame} and optionally
report(tables, data, state, written) -> dict, where `data` is the data section and `tables` the
DataFrames of the tables this job wrote. The kinds (pipelines/*) are pure DataFrame transforms;
every Delta read and write is here, through dlpipe.lake.
"""

from __future__ import annotations

import json
import uuid
from types import ModuleType

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe import lake
from dlpipe.config import DataConfig, PathsConfig, table_uri
from dlpipe.errors import DataQualityError, InputNotFound
from pipelines.contract import reject_duplicate_keys
from pipelines.sources import read_files

REJECTED_SCHEMA = "key string, source string, row long, reason string, job_id string"


def kind_module(kind: str) -> ModuleType:
    import importlib

    return importlib.import_module({"images": "pipelines.image_kind", "table": "pipelines.tables", "ratings":
                                    "pipelines.ratings", "text": "pipelines.text", "timeseries": "pipelines.timeseries"}[kind])


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def run(spark: SparkSession, data: DataConfig, paths: PathsConfig) -> dict:
    """`dlpipe prepare`: the landing zone -> this kind's tables (see the module docstring)."""
    landing = paths.landing
    kind = kind_module(data.kind)
    job_id = uuid.uuid4().hex
    try:
        files = read_files(spark, landing)
    except AnalysisException as exc:
        raise InputNotFound(f"cannot read raw files under {landing}: {exc.getMessage()}") from None
    base_uris = {suffix: table_uri(paths, data, suffix) for suffix in kind.BASE}
    rejected_uri = table_uri(paths, data, "rejected")
    sources_uri = table_uri(paths, data, "sources")
    if data.mode != "overwrite":  # append and merge take in only files no finished job took in
        done = ingested_sources(spark, sources_uri)
        if done:
            seen = spark.createDataFrame([(s,) for s in done], "source string")
            files = files.join(F.broadcast(seen), files["path"] == seen["source"], "left_anti")

    state, state_table = None, None
    if kind.STATE and data.mode != "overwrite" and lake.latest_version(table_uri(paths, data, kind.STATE)) is not None:
        uri = table_uri(paths, data, kind.STATE)
        version = lake.latest_version(uri)
        rows = lake.read_table(spark, uri, version).toPandas()
        state = kind.state_from_rows(rows)
        state_table = {"uri": uri, "version": version, "fitted_by_this_job": False, "rows": len(rows)}

    parsed = kind.assign_split(kind.parse(files, data, landing, state), data)
    existing = _existing_keys(spark, base_uris) if data.mode == "append" else None  # merge updates them
    parsed = reject_duplicate_keys(parsed, existing).persist()
    try:
        return _write(spark, data, paths, kind, job_id, parsed, state, state_table, base_uris, rejected_uri, sources_uri)
    finally:
        parsed.unpersist()


def _write(spark, data, paths, kind, job_id, parsed, state, state_table, base_uris, rejected_uri, sources_uri) -> dict:
    landing = paths.landing
    counts, per_file = {}, {}
    for r in parsed.groupBy("source", "split", F.col("error").isNull().alias("ok")).count().collect():
        counts[r["split"], r["ok"]] = counts.get((r["split"], r["ok"]), 0) + r["count"]
        per_file[r["source"]] = per_file.get(r["source"], 0) + r["count"]
    accepted = sum(n for (_, ok), n in counts.items() if ok)
    rejected = sum(n for (_, ok), n in counts.items() if not ok)
    total = accepted + rejected
    sources = sorted(per_file)
    summary = {"step": "prepare", "kind": data.kind, "mode": data.mode, "job_id": job_id, "source": landing,
               "input_files": len(sources), "input_rows": total, "accepted": accepted, "rejected": rejected,
               "tables": {}}
    if not sources and data.mode != "overwrite":
        say(f"no new source files under {landing}: nothing to {data.mode}, no table written")
        for suffix, uri in base_uris.items():
            version = lake.latest_version(uri)
            summary["tables"][suffix] = {"uri": uri, "version": version, "rows_written": 0,
                                         "rows": 0 if version is None else table_rows(uri, version)}
        return summary
    metadata = {"dlpipe.step": "prepare", "dlpipe.job_id": job_id, "dlpipe.kind": data.kind,
                "dlpipe.mode": data.mode, "dlpipe.source": landing,
                "dlpipe.source_files": json.dumps(sources if len(sources) <= 50 else sources[:50] + ["..."]),
                "dlpipe.source_file_count": str(len(sources))}

    # rejects first: whatever happens next, the reasons are kept and readable
    rejects = parsed.where(F.col("error").isNotNull()).select(
        "key", "source", F.col("row").cast("long"), F.col("error").alias("reason"), F.lit(job_id).alias("job_id"))
    if data.mode != "overwrite" and lake.latest_version(rejected_uri) is not None:
        # the latest verdict per source file: a retried file's old rejects are replaced, not repeated
        old = lake.read_table(spark, rejected_uri).select(*[c.split()[0] for c in REJECTED_SCHEMA.split(", ")])
        rejects = old.join(parsed.select("source").distinct(), "source", "left_anti").unionByName(rejects)
    version = lake.write_table(rejects, rejected_uri, metadata=metadata)
    summary["tables"]["rejected"] = {"uri": rejected_uri, "version": version, "rows_written": rejected,
                                     "rows": table_rows(rejected_uri, version)}
    unit = kind.UNIT
    if rejected:
        say(f"{rejected} of {total} {unit} rejected, reasons in {rejected_uri}")
    if accepted == 0 or rejected > data.max_rejected_fraction * total:
        reasons = parsed.where(F.col("error").isNotNull()).groupBy(F.col("error")).count() \
            .orderBy(F.desc("count"), "error").limit(3).collect()
        raise DataQualityError(
            f"{rejected} of {total} {unit} under {landing} were rejected ({rejected / max(total, 1):.1%}), more than "
            f"data.max_rejected_fraction={data.max_rejected_fraction}; no new version of the train/val/test "
            f"tables was written. Reasons are in {rejected_uri}@{summary['tables']['rejected']['version']}; most common: "
            + "; ".join(f"{r['count']} x {r['error']}" for r in reasons)
        )

    good = parsed.where(F.col("error").isNull()).drop("error")
    if state is None and kind.STATE:
        state = kind.fit(good, data)
        uri = table_uri(paths, data, kind.STATE)
        rows = spark.createDataFrame(kind.state_rows(state), kind.STATE_SCHEMA)
        state_table = {"uri": uri, "version": lake.write_table(rows, uri, metadata=metadata), "fitted_by_this_job": True,
                       "rows": len(kind.state_rows(state))}
    if state_table:
        summary["tables"][kind.STATE] = state_table
        metadata["dlpipe.state"] = f"{state_table['uri']}@{state_table['version']}"
    rows = kind.to_base(good, data, state).persist()  # transformed once, written per table
    written = {}
    try:
        for suffix, uri in base_uris.items():
            part = rows.where(F.col("split") == suffix).drop("split")
            version = write_mode(spark, part, uri, data.mode, metadata)
            written[suffix] = {"uri": uri, "version": version, "rows_written": counts.get((suffix, True), 0)}
            say(f"{data.mode} {uri} version {version}: {written[suffix]['rows_written']} rows from this job")
    finally:
        rows.unpersist()
    for suffix, df in kind.derive(_frames(spark, written), data, state).items():
        uri = table_uri(paths, data, suffix)
        written[suffix] = {"uri": uri, "version": lake.write_table(df, uri, metadata=metadata)}
        say(f"wrote {uri} version {written[suffix]['version']}")
    for table in written.values():
        table["rows"] = table_rows(table["uri"], table["version"])
    # last: the files this job took in, so that append and merge never take them in again
    taken = spark.createDataFrame([(s, job_id, n) for s, n in per_file.items()], "source string, job_id string, rows long")
    written["sources"] = {"uri": sources_uri, "rows_written": len(per_file), "version": lake.write_table(
        taken, sources_uri, mode="overwrite" if data.mode == "overwrite" else "append", metadata=metadata)}
    written["sources"]["rows"] = table_rows(sources_uri, written["sources"]["version"])
    summary["tables"].update(written)
    summary.update(kind.report(_frames(spark, written), data, state, written) if hasattr(kind, "report") else {})
    return summary


def _frames(spark: SparkSession, written: dict) -> dict[str, DataFrame]:
    """The tables this job wrote, each at the version it wrote, for a kind's derive and report."""
    return {suffix: lake.read_table(spark, t["uri"], t["version"]) for suffix, t in written.items()}


def table_rows(uri: str, version: int) -> int:
    """Rows of one table version, from its parquet footers (no Spark job)."""
    import pyarrow.parquet as pq

    from dlpipe.storage import filesystem

    total = 0
    for path in lake.table_files(uri, version):
        fs, inner = filesystem(path)
        with fs.open_input_file(inner) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def write_mode(spark: SparkSession, rows: DataFrame, uri: str, mode: str, metadata: dict) -> int:
    if mode == "merge" and lake.latest_version(uri) is not None:
        old = lake.read_table(spark, uri)
        rows = old.join(rows.select("key"), "key", "left_anti").unionByName(rows)
        mode = "overwrite"
    return lake.write_table(rows, uri, mode=mode, metadata=metadata)


def _existing_keys(spark: SparkSession, base_uris: dict[str, str]) -> DataFrame | None:
    frames = [lake.read_table(spark, uri).select("key", F.lit(uri).alias("table"))
              for uri in base_uris.values() if lake.latest_version(uri) is not None]
    if not frames:
        return None
    out = frames[0]
    for frame in frames[1:]:
        out = out.unionByName(frame)
    return out


def ingested_sources(spark: SparkSession, sources_uri: str) -> set[str]:
    """Source files that a finished prepare job took in (listed in <name>_sources)."""
    if lake.latest_version(sources_uri) is None:
        return set()
    return {r["source"] for r in lake.read_table(spark, sources_uri).select("source").distinct().collect()}
