"""Delta table I/O: delta-spark on the JVM (lake.engine spark, the default where its jars load), else
Spark + delta-rs (lake.engine rs; docs/storage.md).

With delta-rs, Spark tasks write the parquet files (one per partition, unique names) and
the driver commits them to the Delta log with delta-rs in ONE transaction. Files of failed or
retried tasks are never committed: harmless orphans that VACUUM removes.
Tables are URIs: a local path (made absolute), file://, s3:// or s3a:// (delta-rs reaches S3
with dlpipe.storage.delta_options and commits with conditional puts, no lock needed), hdfs:// with
either engine (docs/storage-hdfs.md). Our metadata goes into commitInfo.userMetadata as JSON with both engines, so Spark's
DESCRIBE HISTORY shows it too. Credentials are never part of it.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, Transaction, create_table_with_add_actions
from py4j.java_gateway import JavaClass
from py4j.protocol import Py4JJavaError
from pyspark.sql.types import StructType

from dlpipe import storage, tensors
from dlpipe.errors import ConflictError
from dlpipe.lake_files import ParquetFilesDataSource
from dlpipe.lake_files import write_files as _write_files

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

MODES = ("overwrite", "append")
_COMMIT_ID = "dlpipe.commit_id"  # lets write_table find the exact version of its own commit
_ENGINE = "dlpipe.engine"  # spark (delta-spark) or rs (delta-rs): which engine made the commit
ENGINE_KEY = "dlpipe.lake.engine"  # the session's lake.engine, set by dlpipe.spark.get_session
_FILE_ROWS = "path string, size long, modification_time long, stats string"
_native_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
APP_ID = "dlpipe"  # Delta application transaction (txn) of the writes that name the version they read
ANY = -1  # write_table(expect=ANY): commit on top of whatever the latest version is


def native_delta_available(spark: SparkSession) -> bool:
    """True when this session writes Delta with delta-spark: its engine (dlpipe.spark.get_session,
    `lake.engine`) is not `rs`, io.delta.tables.DeltaTable loads on the driver JVM and the Delta
    SQL extension is on."""
    if spark.conf.get(ENGINE_KEY, "auto") == "rs":
        return False
    if spark not in _native_cache:
        jvm = getattr(spark, "_jvm", None)  # Spark Connect sessions have no JVM handle
        has_class = jvm is not None and isinstance(jvm.io.delta.tables.DeltaTable, JavaClass)
        extensions = spark.conf.get("spark.sql.extensions", "") or ""
        _native_cache[spark] = has_class and "io.delta.sql.DeltaSparkSessionExtension" in extensions
    return _native_cache[spark]


def engine(spark: SparkSession) -> str:
    """The Delta engine this session writes with: "spark" (delta-spark) or "rs" (delta-rs)."""
    return "spark" if native_delta_available(spark) else "rs"


def write_table(
    df: DataFrame, uri: str, *, mode: str = "overwrite", metadata: dict[str, str] | None = None,
    expect: int | None = ANY, properties: dict[str, str] | None = None,
) -> int:
    """Write df as one atomic commit; return the version of that commit. `properties`: Delta
    table properties (delta.*) set where this commit creates the table.

    `expect` (a version, or None for "no table yet") makes the commit conditional: it lands only
    as the very next version after `expect`, else ConflictError and nothing is written. Both
    engines enforce it at commit time, not only before: delta-spark through Delta's application
    transaction (txnAppId/txnVersion: a second writer naming the same next version is skipped or
    refused), delta-rs by committing on top of `expect` without retries."""
    uri = _norm(uri)
    if mode not in MODES:
        raise ValueError(f"Invalid mode for Delta table {uri}: expected one of {MODES}, got {mode!r}")
    native = native_delta_available(df.sparkSession)
    commit_id, user_metadata = _commit_metadata(metadata, native)
    before = latest_version(uri)
    if expect != ANY and before != expect:
        raise _conflict(uri, expect, before)
    if before is not None and mode == "append":
        _check_schema(uri, df)
    if native:
        writer = df.write.format("delta").mode(mode).option("userMetadata", user_metadata)
        for key, value in (properties or {}).items() if before is None else ():
            writer = writer.option(key, value)  # delta-spark sets delta.* writer options as table properties
        if mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if expect != ANY:
            writer = writer.option("txnAppId", APP_ID).option("txnVersion", str(_next(expect)))
        try:
            writer.save(uri)
        except Py4JJavaError as exc:
            if expect != ANY and latest_version(uri) != expect:  # Delta's Concurrent*/MetadataChanged exceptions
                raise _conflict(uri, expect, latest_version(uri)) from None
            raise storage.storage_error(uri, exc) or exc from None
    else:
        _write_with_delta_rs(df, uri, mode, user_metadata, table_exists=before is not None,
                             expect=None if expect == ANY else (expect, _next(expect)), properties=properties)
    version = _find_commit(uri, commit_id, -1 if before is None else before, required=not native)
    if version is None and expect != ANY and latest_version(uri) != before:
        raise _conflict(uri, expect, latest_version(uri))  # delta-spark skipped it: that txn version was taken
    # delta-spark makes no commit when nothing changes (no rows appended, an empty table overwritten
    # by no rows): the table's rows are those of `before`
    return before if version is None else version


def _next(expect: int | None) -> int:
    return 0 if expect is None else expect + 1


def _conflict(uri: str, expect: int | None, now: int | None) -> ConflictError:
    """The one-line error when a table moved under a conditional write, naming who moved it."""
    by = ""
    if now is not None:
        commit = next((c for c in _delta(uri).history(now - (expect if expect is not None else -1))
                       if c["version"] == _next(expect)), None)
        meta = _user_metadata(commit) if commit else {}
        if meta.get("dlpipe.job_id"):
            by = f" (version {_next(expect)} by {meta.get('dlpipe.step', 'a')} job {meta['dlpipe.job_id']})"
    read = "did not exist" if expect is None else f"was at version {expect}"
    return ConflictError(f"Delta table {uri} {read} when this job read it and is now at version {now}{by}: "
                         "another job wrote to it meanwhile; this job's commit was refused, nothing more was written. "
                         "Rerun the job: it takes only what is left")


def read_table(spark: SparkSession, uri: str, version: int | None = None, *, stored: bool = False) -> DataFrame:
    """The table at `version` (default: the latest, pinned now) as a DataFrame, its tensor columns
    (pixels, features) as array<float>; `stored=True`: as stored (bytes, dlpipe.tensors)."""
    uri = _norm(uri)
    table = _open(uri, version)
    if native_delta_available(spark):
        df = spark.read.format("delta").option("versionAsOf", table.version()).load(uri)
    else:
        df = read_parquet(spark, table.file_uris(), _spark_schema(_files_are_rows(uri, table)))
    return df if stored else tensors.spark_arrays(df)


def read_parquet(spark: SparkSession, files: list[str], schema: StructType) -> DataFrame:
    """These Parquet files as one DataFrame of `schema`: Spark's reader, or pyarrow in Spark
    tasks where the JVM cannot open the scheme (s3:// without hadoop-aws)."""
    if not files:
        return spark.createDataFrame([], schema)
    if storage.spark_uri(spark, files[0]) is None:
        spark.dataSource.register(ParquetFilesDataSource)
        return spark.read.format(ParquetFilesDataSource.name()).schema(schema).option("files", json.dumps(files)).load()
    return spark.read.schema(schema).parquet(*[storage.spark_uri(spark, f) for f in files])


def latest_version(uri: str) -> int | None:
    uri = _norm(uri)
    if not _is_table(uri):
        return None
    return _delta(uri).version()


def table_files(uri: str, version: int) -> list[str]:
    """Absolute locations of the parquet files of one snapshot (plain paths for local tables),
    for readers that read them whole (the training shard loader). Refuses a snapshot whose rows
    are not exactly its files' rows (deletion vectors, column mapping), naming the feature."""
    uri = _norm(uri)
    return _files_are_rows(uri, _open(uri, version)).file_uris()


def table_rows(uri: str, version: int) -> int:
    """Rows of one snapshot, from the log's per-file statistics (no data read)."""
    uri = _norm(uri)
    actions = pa.table(_files_are_rows(uri, _open(uri, version)).get_add_actions(flatten=True))
    return int(sum(n or 0 for n in actions.column("num_records").to_pylist()))


def schema(uri: str, version: int) -> StructType:
    """The Spark schema of one snapshot, from its log (no data read)."""
    uri = _norm(uri)
    return _spark_schema(_open(uri, version))


def read_columns(uri: str, version: int, columns: list[str]) -> pa.Table:
    """Some columns of one snapshot, read with delta-rs on the driver (small tables: no Spark job)."""
    uri = _norm(uri)
    return _files_are_rows(uri, _open(uri, version)).to_pyarrow_table(columns=columns)


def dataset(uri: str, version: int):
    """One snapshot as a pyarrow dataset, for the driver to stream (`to_batches`) or peek at
    (`head`) without a Spark job."""
    uri = _norm(uri)
    return _files_are_rows(uri, _open(uri, version)).to_pyarrow_dataset()


def history(uri: str) -> list[dict[str, Any]]:
    """Commits, newest first: version, timestamp (ms since epoch), operation, metadata."""
    uri = _norm(uri)
    return [
        {
            "version": c["version"],
            "timestamp": c["timestamp"],
            "operation": c.get("operation"),
            "engine": _user_metadata(c).get(_ENGINE) or _engine_of(c),
            "metadata": {k: v for k, v in _user_metadata(c).items() if k not in (_COMMIT_ID, _ENGINE)},
        }
        for c in _open(uri, None).history()
    ]


def vacuum(uri: str, retain_hours: int, *, dry_run: bool = False, spark: SparkSession | None = None) -> list[str]:
    """Delete the files that no version of the last `retain_hours` hours needs: files removed by
    older commits, and files no commit ever named (orphans of failed or killed writes) older than
    that. Returns those files (with dry_run, only lists them). Versions older than the retention
    can no longer be read afterwards. Native VACUUM when `spark` has delta-spark, else delta-rs."""
    uri = _norm(uri)
    if retain_hours < 0:
        raise ValueError(f"retain_hours for VACUUM of Delta table {uri} must be >= 0, got {retain_hours}")
    _open(uri, None)  # names the table when it is not one
    if spark is not None and native_delta_available(spark):
        # below the 7-day default the native engine wants this check off, as delta-rs below
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        sql = f"VACUUM delta.`{uri}` RETAIN {int(retain_hours)} HOURS"
        files = [row[0] for row in spark.sql(sql + " DRY RUN").collect()]
        if not dry_run and files:
            spark.sql(sql).collect()
        return files
    return _delta(uri).vacuum(retention_hours=int(retain_hours), dry_run=dry_run, enforce_retention_duration=False,
                              full=True)


def _write_with_delta_rs(
    df: DataFrame, uri: str, mode: str, user_metadata: str, *, table_exists: bool,
    expect: tuple[int | None, int] | None = None, properties: dict[str, str] | None = None,
) -> None:
    """`expect` = (the version read, the txn version): commit exactly on top of it, no retries."""
    schema = Schema.from_json(df.schema.json())  # Delta's schema JSON is Spark's
    rows = df.mapInArrow(functools.partial(_write_files, uri), _FILE_ROWS).collect()
    actions = [AddAction(r.path, r.size, {}, r.modification_time, True, r.stats) for r in rows]
    props = CommitProperties(custom_metadata={"userMetadata": user_metadata})
    if expect is not None:
        props = CommitProperties(custom_metadata={"userMetadata": user_metadata}, max_commit_retries=0,
                                 app_transactions=[Transaction(APP_ID, expect[1])])
    try:
        if table_exists:
            table = _delta(uri) if expect is None else _delta(uri, expect[0])
            table.create_write_transaction(actions, mode, schema, commit_properties=props)
        else:
            create_table_with_add_actions(uri, schema, actions, mode="error", storage_options=storage.delta_options(uri),
                                          configuration=properties, commit_properties=props)
    except (DeltaError, OSError):
        if expect is not None and latest_version(uri) != expect[0]:
            raise _conflict(uri, expect[0], latest_version(uri)) from None
        raise


def _commit_metadata(metadata: dict[str, str] | None, native: bool) -> tuple[str, str]:
    """(a new commit id, the commit's userMetadata JSON: ours, the engine, that id)."""
    commit_id = str(uuid.uuid4())
    return commit_id, json.dumps({**(metadata or {}), _ENGINE: "spark" if native else "rs", _COMMIT_ID: commit_id})


def _check_schema(uri: str, df: DataFrame) -> None:
    """Both engines refuse to add rows of another schema (names and types, not nullability); delta-spark
    alone would take a subset of the columns and fill the rest with nulls."""
    current = _spark_schema(_delta(uri))
    if current.simpleString() != df.schema.simpleString():
        raise ValueError(f"Cannot write to Delta table {uri}: expected schema {current.simpleString()}, "
                         f"received {df.schema.simpleString()}")


def _find_commit(uri: str, commit_id: str, before: int, *, required: bool = True) -> int | None:
    """Our commit is one of the versions after `before`; other writers may have committed too."""
    table = _delta(uri)
    for commit in table.history(table.version() - before):
        if _user_metadata(commit).get(_COMMIT_ID) == commit_id:
            return commit["version"]
    if required:
        raise RuntimeError(f"Commit {commit_id} not found in the log of Delta table {uri}")
    return None


def _open(uri: str, version: int | None) -> DeltaTable:
    if not _is_table(uri):
        raise FileNotFoundError(f"no Delta table at {uri}")
    table = _delta(uri)
    latest = table.version()
    if version is None or version == latest:
        return table
    if not 0 <= version < latest:
        raise ValueError(f"Delta table {uri} has no version {version}; the latest is {latest}")
    try:
        table.load_as_version(version)
    except DeltaError as e:  # e.g. the log of old versions was cleaned up
        raise ValueError(f"Cannot load version {version} of Delta table {uri} (latest {latest}): {e}") from e
    return table


def _files_are_rows(uri: str, table: DeltaTable) -> DeltaTable:
    """The table, when reading its snapshot's Parquet files whole gives exactly its rows and columns.
    Deletion vectors (delta-spark's MERGE, DELETE and UPDATE where delta.enableDeletionVectors is on)
    leave deleted rows in the files; column mapping renames the columns inside them. Both are
    refused in one line; delta-spark reads such tables correctly (lake.engine=spark)."""
    where = f"Delta table {uri} version {table.version()}"
    mode = table.metadata().configuration.get("delta.columnMapping.mode", "none")
    if mode != "none":
        raise ValueError(f"{where} uses column mapping (delta.columnMapping.mode={mode}): its Parquet files hold "
                         "physical column names; dlpipe reads such tables only through delta-spark (lake.engine=spark)")
    if "deletionVectors" in (table.protocol().reader_features or []):
        files = pa.table(table.deletion_vectors()).num_rows
        if files:
            raise ValueError(f"{where} has deletion vectors on {files} file(s): those files still hold deleted rows; "
                             f"rewrite them with `REORG TABLE delta.`{uri}` APPLY (PURGE)` and pin the new version")
    return table


def _is_table(uri: str) -> bool:
    try:
        return DeltaTable.is_deltatable(uri, storage.delta_options(uri))
    except OSError as exc:  # missing bucket, wrong credentials: say so, naming the table
        raise storage.clear_error(uri, exc) from None


def _delta(uri: str, version: int | None = None) -> DeltaTable:
    return DeltaTable(uri, version=version, storage_options=storage.delta_options(uri))


def _spark_schema(table: DeltaTable) -> StructType:
    return StructType.fromJson(json.loads(table.schema().to_json()))


def _engine_of(commit: dict[str, Any]) -> str | None:
    """A commit not made by dlpipe: delta-spark writes engineInfo, delta-rs clientVersion."""
    if "Delta-Lake" in str(commit.get("engineInfo", "")):
        return "spark"
    return "rs" if "delta-rs" in str(commit.get("clientVersion", "")) else None


def _user_metadata(commit: dict[str, Any]) -> dict[str, Any]:
    raw = commit.get("userMetadata")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = None
    return meta if isinstance(meta, dict) else {"userMetadata": raw}


def _norm(uri: str) -> str:
    uri = os.fspath(uri)
    return uri if "://" in uri else os.path.abspath(uri)


def replace_where(df: DataFrame, uri: str, where: dict[str, Any], *, metadata: dict[str, str] | None = None) -> int:
    """Replace the rows with `column == value` for every item of `where` by df, in ONE commit
    (Delta's replaceWhere), so a rerun of the same slice never duplicates it; creates the table
    if needed. Returns the version of that commit."""
    uri = _norm(uri)
    before = latest_version(uri)
    if before is None:
        return write_table(df, uri, mode="append", metadata=metadata)
    _check_schema(uri, df)
    native = native_delta_available(df.sparkSession)
    commit_id, user_metadata = _commit_metadata(metadata, native)
    if native:
        condition = " AND ".join(f"`{col}` = '{value}'" for col, value in where.items())
        (df.write.format("delta").mode("overwrite").option("replaceWhere", condition)
         .option("userMetadata", user_metadata).save(uri))
        return _find_commit(uri, commit_id, before)
    table = _delta(uri)
    removes = [RemoveAction(path, True, int(time.time() * 1000), size)
               for path, size in _files_where(uri, table, where)]
    rows = df.mapInArrow(functools.partial(_write_files, uri), _FILE_ROWS).collect()
    adds = [AddAction(r.path, r.size, {}, r.modification_time, True, r.stats) for r in rows]
    table.create_write_transaction(adds + removes, "append", Schema.from_json(df.schema.json()),
                                   commit_properties=CommitProperties(custom_metadata={"userMetadata": user_metadata}))
    return _find_commit(uri, commit_id, before)


def _files_where(uri: str, table: DeltaTable, where: dict[str, Any]) -> list[tuple[str, int]]:
    """(path, size) of the data files whose rows all match `where`. Each job writes its own
    files, so a file is wholly inside or outside a slice; a file that mixes both is an error."""
    fs, base = storage.filesystem(uri)
    actions = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    matching = []
    for path, size in zip(actions["path"], actions["size_bytes"]):
        data = pq.ParquetFile(f"{base}/{path}", filesystem=fs).read(columns=list(where))
        mask = functools.reduce(pc.and_, [pc.equal(data.column(c), pa.scalar(v, data.schema.field(c).type))
                                          for c, v in where.items()])
        inside = pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
        if inside and inside == data.num_rows:
            matching.append((path, size))
        elif inside:
            raise ValueError(f"file {path} of Delta table {uri} holds rows inside and outside the slice {where}: "
                             "cannot replace the slice file by file")
    return matching
