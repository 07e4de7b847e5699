"""The prepare job for every data kind: raw files under paths.landing -> validated, versioned
Delta tables, in one pass over the raw data. The contract handling is the same for every kind:

- the driver lists the landing zone (pipelines.sources); in append and merge mode only files no
  finished job took in (as listed in <name>_sources) are read;
- one Spark job reads and parses every file once (the kind's parser, Arrow-batched in the task
  that read the file), tags each row with its split or its reject reason and writes them all to
  a staging Parquet folder under the lake, one folder per split. Everything after it reads the
  columns it needs from there: counts, duplicate keys, fitted state and the table writes (Spark's
  own Delta writer; delta-rs where no jars are present);
- every repeat of a key, and in append mode a key already in the tables from another file, is
  rejected with the reason; a key already stored from the SAME file (a job killed half-way, or
  a concurrent job) is not stored again;
- input = accepted + rejected, counted independently: the files listed against the files that
  produced rows (a file that vanished is a rejected row, not a loss), the rows parsed against
  the rows each commit added (from the Delta log); a mismatch fails the job;
- above data.max_rejected_fraction the job fails after writing the rejects and before writing
  any output table;
- every commit is conditional on the table version this job read (lake.write_table(expect=)):
  of two overlapping jobs one wins, the other stops with ConflictError (exit code 6) before it
  writes anything to a table the winner wrote; rejects are written first, the sources last;
- fitted state (standardization statistics, vocabularies) comes from the train split only, is
  written as its own Delta table and is reused, not refitted, by append and merge;
- every commit carries the job id, kind, mode and source URIs in its metadata.

A kind is a module with: BASE (tables the accepted rows go to, named by their `split` column),
STATE (suffix of the fitted-state table or None), UNIT, parser(data, root, state) ->
pipelines.sources.Parser, assign_split(df, data), fit(accepted, data), state_rows(state),
state_from_rows(pdf), to_base(accepted, data, state), derive(tables, data, state) -> {suffix:
DataFrame}, optionally report(tables, data, state, written) -> dict, UNIQUE_KEYS (one row per
file). A kind whose staged columns are costly for Spark's row format (arrays: the table kind) has
instead of fit and to_base: FIT_SCHEMA, fit_part(data) (one Arrow batch of staged rows -> its part
of the state), merge_parts(parts, data), base_schema(data) and transform(data, state) (one Arrow
batch of staged rows -> table rows); prepare runs them in Python on the staged files
(pipelines.sources.scan_staged, map_staged), without the rows a job must not store. The kinds
(pipelines/*) are pure transforms; every Delta read and write is here, through dlpipe.lake.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
import uuid
from types import ModuleType

import numpy as np

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import Window
from pyspark.sql.types import ArrayType, BooleanType, DateType, NumericType, StringType, TimestampType

from dlpipe import lake, storage, tensors
from dlpipe.config import DataConfig, PathsConfig, table_uri
from dlpipe.errors import DataQualityError, DlpipeError, InputNotFound
from pipelines.sources import list_files, map_staged, read_staged, scan_staged, stage_parsed

REJECTED_SCHEMA = "key string, source string, row long, reason string, job_id string"
REJECTED = "rejected"  # the staging split of rows with a reason
KINDS = {"images": "pipelines.image_kind", "table": "pipelines.tables", "ratings": "pipelines.ratings",
         "text": "pipelines.text", "timeseries": "pipelines.timeseries", "trees": "pipelines.trees"}


class ReconciliationError(DlpipeError, RuntimeError):
    """The independent counts of a prepare job disagree; its sources are not marked as taken."""


def kind_module(kind: str) -> ModuleType:
    return importlib.import_module(KINDS[kind])


_started = [time.perf_counter()]  # the running job's start, for the elapsed time in its messages


def say(message: str) -> None:
    print(f"dlpipe: [{time.perf_counter() - _started[0]:6.1f} s] {message}", flush=True)


def run(spark: SparkSession, data: DataConfig, paths: PathsConfig) -> dict:
    """`dlpipe prepare`: the landing zone -> this kind's tables (see the module docstring)."""
    started = _started[0] = time.perf_counter()
    landing, kind, job_id = paths.landing, kind_module(data.kind), uuid.uuid4().hex
    uris = {suffix: table_uri(paths, data, suffix) for suffix in (*kind.BASE, REJECTED, "sources")}
    if kind.STATE:
        uris[kind.STATE] = table_uri(paths, data, kind.STATE)
    read = {suffix: lake.latest_version(uri) for suffix, uri in uris.items()}  # every commit lands on these
    listed = list_files(landing)  # a missing folder or bucket: FileNotFoundError (exit code 4), no access: 1
    taken = ingested_sources(uris["sources"], read["sources"]) if data.mode != "overwrite" else set()
    files = [(path, size) for path, size in listed if path not in taken]
    summary = {"step": "prepare", "kind": data.kind, "mode": data.mode, "job_id": job_id, "source": landing,
               "listed_files": len(listed), "input_files": len(files), "input_rows": 0, "accepted": 0, "rejected": 0,
               "tables": {}}
    if not files:
        if data.mode == "overwrite":
            raise InputNotFound(f"no files under {landing}")
        say(f"no new source files under {landing} ({len(listed)} listed, all taken in before): nothing to {data.mode}")
        for suffix in kind.BASE:
            v = read[suffix]
            summary["tables"][suffix] = {"uri": uris[suffix], "version": v, "rows_written": 0,
                                         "rows": 0 if v is None else lake.table_rows(uris[suffix], v)}
        return summary | {"seconds": round(time.perf_counter() - started, 3)}

    state, state_table = None, None
    if kind.STATE and data.mode != "overwrite" and read[kind.STATE] is not None:
        rows = lake.read_table(spark, uris[kind.STATE], read[kind.STATE]).toPandas()
        state = kind.state_from_rows(rows)
        state_table = {"uri": uris[kind.STATE], "version": read[kind.STATE], "fitted_by_this_job": False, "rows": len(rows)}

    say(f"reading {len(files)} files under {landing} ({len(listed)} listed)")
    parser = kind.parser(data, landing, state)
    root = paths.lake if "://" in paths.lake else os.path.abspath(paths.lake)
    staging = storage.join(root, "_staging", job_id)
    try:
        parts = stage_parsed(spark, files, parser, staging)
        staged, per_file, accepted_in = _stage(spark, parts, parser.schema, kind, data)
        say(f"read and parsed every file once, rows staged in {staging}")
        with _even_scans(spark):
            summary.update(_write(spark, data, landing, kind, job_id, files, staged, per_file, state, state_table,
                                  uris, read, (staging, parts, accepted_in)))
    finally:
        _remove(staging)
    return summary | {"seconds": round(time.perf_counter() - started, 3)}


def _stage(spark: SparkSession, written: dict[str, list[str]], schema: str, kind, data):
    """(every staged row with its `split`, or REJECTED with its error; rows per source file; the
    accepted rows of some staged files, with their split)."""
    def read(files: list[str], ddl: str) -> DataFrame:
        df = lake.read_parquet(spark, files, spark.createDataFrame([], ddl).schema)
        return df if "row" in df.columns else df.withColumn("row", F.lit(None).cast("long"))

    def accepted_in(files: list[str]) -> DataFrame:
        return kind.assign_split(read(files, schema), data)

    rejected = read(written["rejected"], schema)
    staged = accepted_in(written["accepted"]).unionByName(rejected.withColumn("split", F.lit(REJECTED)))
    return staged, lake.read_parquet(spark, written["sources"], spark.createDataFrame([], "source string, rows long").schema), \
        accepted_in


SCAN_TASKS_PER_CORE = 4


@contextlib.contextmanager
def _even_scans(spark: SparkSession):
    """Split the staged files into SCAN_TASKS_PER_CORE scan tasks per core while this job runs.
    Spark's default (as many splits as cores, files packed whole) gave the table writes 3 tasks
    on 2 cores: the third ran alone, a third of a write's time (docs/performance.md). The staged
    files have small row groups, so Spark can cut them evenly. A value set with spark-submit wins."""
    key = "spark.sql.files.minPartitionNum"
    if spark.conf.get(key, None) is not None:
        yield
        return
    spark.conf.set(key, str(SCAN_TASKS_PER_CORE * spark.sparkContext.defaultParallelism))
    try:
        yield
    finally:
        spark.conf.unset(key)


def _remove(uri: str) -> None:
    try:
        filesystem, path = storage.filesystem(uri)
        filesystem.delete_dir(path)
    except Exception as exc:  # a leftover staging folder is harmless; say so
        say(f"could not remove the staging folder {uri}: {exc}")


def _write(spark, data, landing, kind, job_id, files, staged, per_file, state, state_table, uris, read,
           staging: tuple) -> dict:
    """`staging`: the staging folder, its files by folder (pipelines.sources.stage_parsed) and
    _stage's reader of accepted rows."""
    folder, parts, accepted_in = staging
    base = list(kind.BASE)
    keys = staged.where(F.col("split") != REJECTED).select("key", "source", "row", "split")
    counts = {r["split"]: r["count"] for r in staged.groupBy("split").count().collect()}
    losers = _losers(spark, keys, sum(n for s, n in counts.items() if s != REJECTED), uris, read, base, data.mode,
                     getattr(kind, "UNIQUE_KEYS", False), parts["keys"])
    if per_file.count() != len(files):  # the parser gives every file at least one row, readable or not
        seen = {r["source"] for r in per_file.select("source").collect()}
        lost = sorted({path for path, _ in files} - seen)
        raise ReconciliationError(f"{len(lost)} of {len(files)} files listed under {landing} produced no row "
                                  f"(first: {lost[:1]}); nothing was written")
    already, duplicates = 0, 0
    if losers is not None:
        for r in losers.groupBy("split", F.col("reason").isNull().alias("stored")).count().collect():
            counts[r["split"]] -= r["count"]
            already += r["count"] if r["stored"] else 0
            duplicates += 0 if r["stored"] else r["count"]
    rejected = counts.pop(REJECTED, 0) + duplicates
    accepted = sum(counts.values())
    total = accepted + rejected + already
    out = {"input_rows": total, "accepted": accepted, "rejected": rejected, "already_stored": already, "tables": {}}
    if already:
        say(f"{already} rows of these files are already in the tables (a job that stopped half-way, or one running "
            "beside this one): not stored again")
    metadata = {"dlpipe.step": "prepare", "dlpipe.job_id": job_id, "dlpipe.kind": data.kind,
                "dlpipe.mode": data.mode, "dlpipe.source": landing,
                "dlpipe.source_files": json.dumps([p for p, _ in files][:50] + (["..."] if len(files) > 50 else [])),
                "dlpipe.source_file_count": str(len(files))}

    # rejects first: whatever happens next, the reasons are kept and readable
    rejects = staged.where(F.col("split") == REJECTED).select(
        "key", "source", F.col("row").cast("long"), F.col("error").alias("reason"), F.lit(job_id).alias("job_id"))
    if duplicates:
        rejects = rejects.unionByName(losers.where(F.col("reason").isNotNull()).select(
            "key", "source", F.col("row").cast("long"), "reason", F.lit(job_id).alias("job_id")))
    if data.mode != "overwrite" and read[REJECTED] is not None:
        # the latest verdict per source file: a retried file's old rejects are replaced, not repeated
        old = lake.read_table(spark, uris[REJECTED], read[REJECTED]).select(*[c.split()[0] for c in REJECTED_SCHEMA.split(", ")])
        rejects = old.join(per_file.select("source"), "source", "left_anti").unionByName(rejects)
    version = lake.write_table(rejects, uris[REJECTED], metadata=metadata, expect=read[REJECTED])
    out["tables"][REJECTED] = {"uri": uris[REJECTED], "version": version, "rows_written": rejected,
                               "rows": lake.table_rows(uris[REJECTED], version)}
    if rejected:
        say(f"{rejected} of {total} {kind.UNIT} rejected, reasons in {uris[REJECTED]}")
    if accepted == 0 and already == 0 or rejected > data.max_rejected_fraction * total:
        reasons = rejects.where(F.col("job_id") == job_id).groupBy("reason").count() \
            .orderBy(F.desc("count"), "reason").limit(3).collect()
        raise DataQualityError(
            f"{rejected} of {total} {kind.UNIT} under {landing} were rejected ({rejected / max(total, 1):.1%}), more than "
            f"data.max_rejected_fraction={data.max_rejected_fraction}; no new version of the train/val/test "
            f"tables was written. Reasons are in {uris[REJECTED]}@{version}; most common: "
            + "; ".join(f"{r['count']} x {r['reason']}" for r in reasons)
        )

    def kept(rows: DataFrame) -> DataFrame:  # accepted rows, less those not to store
        rows = rows.drop("error")
        if losers is None:
            return rows
        drop = F.broadcast(losers.select(*[F.col(c).alias(f"_{c}") for c in ("key", "source", "row")]))
        return rows.join(drop, (rows["key"] == drop["_key"]) & (rows["source"] == drop["_source"])
                         & rows["row"].eqNullSafe(drop["_row"]), "left_anti")  # images have no row: null

    good = kept(staged.where(F.col("split") != REJECTED))
    # with nothing dropped, the rows to write are the staged counts already taken: no second scan
    to_write = dict(counts) if losers is None else {r["split"]: r["count"] for r in good.groupBy("split").count().collect()}
    if any(to_write.get(s, 0) != counts.get(s, 0) for s in base) or set(to_write) - set(base):
        raise ReconciliationError(f"rows to write per table {to_write} differ from the rows accepted {counts}; "
                                  "nothing but the rejects was written")
    python = hasattr(kind, "transform")  # the kind fits and makes its rows in Python, from the staged files
    dropped = _dropped(losers, folder) if python and losers is not None else None
    if state is None and kind.STATE:
        if not python:
            state = kind.fit(good, data)
        elif dropped is None:  # the parts the staging tasks gave
            state = kind.merge_parts(read_staged(parts["parts"], kind.FIT_SCHEMA), data)
        else:  # the parts again, without the rows not to store
            state = kind.merge_parts(scan_staged(spark, parts["accepted"], kind.fit_part(data), kind.FIT_SCHEMA, dropped).toPandas(),
                                     data)
        rows = spark.createDataFrame(kind.state_rows(state), kind.STATE_SCHEMA)
        state_table = {"uri": uris[kind.STATE], "version": lake.write_table(rows, uris[kind.STATE], metadata=metadata,
                                                                            expect=read[kind.STATE]),
                       "fitted_by_this_job": True, "rows": len(kind.state_rows(state))}
    if state_table:
        out["tables"][kind.STATE] = state_table
        metadata["dlpipe.state"] = f"{state_table['uri']}@{state_table['version']}"
    made = None
    if python:  # the staged columns never take Spark's row format (pipelines.sources.map_staged)
        made, made_rows = map_staged(spark, parts["accepted"], kind.transform(data, state), storage.join(folder, "base"),
                                     dropped)
        if any(made_rows.get(s, 0) != counts.get(s, 0) for s in base) or set(made_rows) - set(base):
            raise ReconciliationError(f"rows made per table {made_rows} differ from the rows accepted {counts}; "
                                      "nothing but the rejects was written")
    written = {}
    for suffix in base:
        if made is not None:
            part = lake.read_parquet(spark, made.get(suffix, []), spark.createDataFrame([], kind.base_schema(data)).schema)
        else:  # where the staging tasks wrote each split apart, only this table's files are read
            rows = kept(accepted_in(parts[f"accepted/{suffix}"])) if f"accepted/{suffix}" in parts else good
            part = kind.to_base(rows.where(F.col("split") == suffix), data, state)
        part = part.drop("split")
        version = _write_split(spark, part, uris[suffix], data.mode, metadata, read[suffix])
        written[suffix] = {"uri": uris[suffix], "version": version, "rows_written": counts.get(suffix, 0)}
        say(f"{data.mode} {uris[suffix]} version {version}: {written[suffix]['rows_written']} rows from this job")
    for table in written.values():
        table["rows"] = lake.table_rows(table["uri"], table["version"])
    _reconcile(written, read, data.mode, accepted)
    for suffix, df in kind.derive(_frames(spark, written), data, state).items():
        uri = uris[REJECTED][: -len(REJECTED)] + suffix  # beside the others: <lake>/<name>_<suffix>
        written[suffix] = {"uri": uri, "version": lake.write_table(df, uri, metadata=metadata)}
        written[suffix]["rows"] = lake.table_rows(uri, written[suffix]["version"])
        say(f"wrote {uri} version {written[suffix]['version']}")
    # last: the files this job took in, so that append and merge never take them in again
    sources = per_file.select("source", F.lit(job_id).alias("job_id"), F.col("rows").cast("long"))
    written["sources"] = {"uri": uris["sources"], "rows_written": len(files), "version": lake.write_table(
        sources, uris["sources"], mode="overwrite" if data.mode == "overwrite" else "append", metadata=metadata,
        expect=read["sources"])}
    written["sources"]["rows"] = lake.table_rows(uris["sources"], written["sources"]["version"])
    out["tables"].update(written)
    if losers is not None:
        losers.unpersist()
    out.update(kind.report(_frames(spark, written), data, state, written) if hasattr(kind, "report") else {})
    return out


def _losers(spark, keys: DataFrame, rows: int, uris, read, base, mode: str, unique: bool,
            hashes: list[str]) -> DataFrame | None:
    """Rows that must not be stored: (key, source, row, split, reason). Every repeat of a key
    after its first (by source file and row) gets a reason; in append mode so does a key already
    in the tables from another file, while a key already stored from the same file gets reason
    null (stored before, not again). Reads only the key columns; None when there is none.
    `rows`: how many `keys` holds. `unique`: the kind's keys cannot repeat within a job (one row
    per file), no check needed. `hashes`: the staged files of the keys' hashes."""
    window = Window.partitionBy("key").orderBy("source", "row")
    first = F.first(F.struct("source", "row")).over(window)
    where = F.concat(first["source"], F.when(first["row"].isNotNull(), F.concat(F.lit(" line "), first["row"])).otherwise(F.lit("")))
    # a repeat is rare: the keys' hashes rule it out, and only then are the rows ranked per key
    # (a shuffle and sort of every key with its source)
    repeats = not unique and _may_repeat(keys, rows, hashes)
    frames = [keys.withColumn("reason", F.when(F.row_number().over(window) > 1, F.concat(
        F.lit("duplicate key "), F.col("key"), F.lit(" (first seen in "), where, F.lit(")")))).where(
        F.col("reason").isNotNull())] if repeats else []
    if mode == "append":
        stored = [lake.read_table(spark, uris[s], read[s], stored=True).select("key", F.col("source").alias("_from"), F.lit(uris[s]).alias("_in"))
                  for s in base if read[s] is not None]
        if stored:
            known = stored[0]
            for frame in stored[1:]:
                known = known.unionByName(frame)
            frames.append(keys.join(known, "key").withColumn("reason", F.when(F.col("_from") != F.col("source"), F.concat(
                F.lit("duplicate key "), F.col("key"), F.lit(" already in "), F.col("_in"),
                F.lit(" (data.mode=merge updates keys)")))).drop("_from", "_in"))
    if not frames:
        return None
    losers = frames[0]
    for frame in frames[1:]:
        losers = losers.unionByName(frame)
    losers = losers.dropDuplicates(["key", "source", "row"]).cache()
    if losers.count() == 0:
        losers.unpersist()
        return None
    return losers


DRIVER_KEY_CHECK = 20_000_000  # up to this many keys, their 8-byte hashes are checked on the driver


def _may_repeat(keys: DataFrame, rows: int, hashes: list[str]) -> bool:
    """Whether some key may repeat: the hashes the staging tasks took of the `rows` keys, sorted on
    the driver (a repeated hash is a repeated key or, rarely, two keys with one hash: the exact
    check follows either way). The staged hashes may also hold keys of rows the kind's split
    rejects later (trees split by file name): they can only call for the exact check. Above
    DRIVER_KEY_CHECK keys Spark counts the distinct keys."""
    if rows > DRIVER_KEY_CHECK:
        return keys.select("key").distinct().count() < rows
    values = np.sort(read_staged(hashes, "hash long")["hash"].to_numpy())
    if len(values) < rows:
        raise ReconciliationError(f"the staging tasks hashed {len(values)} keys, but {rows} rows were accepted; "
                                  "nothing was written")
    return bool((values[1:] == values[:-1]).any())


STATS_TYPES = (StringType, NumericType, BooleanType, DateType, TimestampType)


def _write_split(spark, rows: DataFrame, uri: str, mode: str, metadata: dict, read: int | None) -> int:
    if mode != "overwrite" and read is not None:
        stored = lake.schema(uri, read)
        if any(c in rows.columns and c in stored.fieldNames() and isinstance(stored[c].dataType, ArrayType)
               for c in tensors.STORED):
            rows = tensors.spark_arrays(rows)  # a table written with array<float> tensors keeps them
    if mode == "merge" and read is not None:
        old = lake.read_table(spark, uri, read, stored=True)
        rows = old.join(rows.select("key"), "key", "left_anti").unionByName(rows)
        mode = "overwrite"
    # Delta's per-file statistics (data skipping) on the plain columns a reader filters on: not
    # on tensors and other arrays or bytes (no min/max), nor on the source paths, which cost a fifth
    # of a table write (docs/performance.md)
    stats = [f.name for f in rows.schema.fields if f.name != "source" and isinstance(f.dataType, STATS_TYPES)]
    return lake.write_table(rows, uri, mode=mode, metadata=metadata, expect=read,
                            properties={"delta.dataSkippingStatsColumns": ",".join(stats)})


def _dropped(losers: DataFrame, staging: str) -> str:
    """The rows not to store (key, source, row) as one Parquet file under `staging`, for the
    kind's Python passes over the staged files."""
    import pyarrow.parquet as pq

    uri = storage.join(staging, "dropped.parquet")
    filesystem, path = storage.filesystem(uri)
    pq.write_table(losers.select("key", "source", F.col("row").cast("long")).toArrow(), path, filesystem=filesystem)
    return uri


def _reconcile(written: dict, read: dict, mode: str, accepted: int) -> None:
    """The rows each commit added, from the Delta log, against the rows parsed and accepted."""
    if mode == "merge":
        return  # a merge replaces rows: the tables' own sizes do not count this job's rows
    added = {s: t["rows"] - (lake.table_rows(t["uri"], read[s]) if mode == "append" and read[s] is not None else 0)
             for s, t in written.items()}
    for suffix, table in written.items():
        if added[suffix] != table["rows_written"]:
            raise ReconciliationError(
                f"{table['uri']}@{table['version']} gained {added[suffix]} rows, but this job accepted "
                f"{table['rows_written']} for it; the sources were not marked as taken: rerun the job")
    if sum(added.values()) != accepted:
        raise ReconciliationError(f"train + val + test gained {sum(added.values())} rows, this job accepted {accepted}")


def _frames(spark: SparkSession, written: dict) -> dict[str, DataFrame]:
    """The tables this job wrote, each at the version it wrote, for a kind's derive and report."""
    return {suffix: lake.read_table(spark, t["uri"], t["version"], stored=True) for suffix, t in written.items()}


def ingested_sources(sources_uri: str, version: int | None) -> set[str]:
    """Source files that a finished prepare job took in (listed in <name>_sources at `version`),
    read from the table's files without a Spark job."""
    if version is None:
        return set()
    return set(lake.read_columns(sources_uri, version, ["source"]).column("source").to_pylist())
