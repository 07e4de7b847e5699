"""Raw files under a landing URI: listed once on the driver, then read and parsed in ONE pass by
Spark tasks, whatever the scheme (local path, file://, hdfs://, s3://, s3a://).

The driver lists the files with pyarrow (hdfs-native for HDFS): hidden and _-prefixed files and
folders are skipped, as Spark does, and zero-byte files are kept (so that they get rejected).
That listing is the job's own count of its input. Each Spark task then takes a slice of the
listing, reads its files and hands their bytes to the kind's parser in the same Python process:
no file's bytes cross into the JVM and back, and no per-file task is planned by the JVM. A file
that cannot be read any more (deleted or replaced between listing and reading) becomes one row
with the reason, never a silent loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
from pyarrow import fs

from dlpipe import storage

FILE_COST = 16 << 10  # a file costs at least this many bytes when slicing (Spark's openCostInBytes idea)
SLICE_BYTES = 64 << 20
SLICE_FILES = 5000
READ_CHUNK = 256  # files handed to the parser at once


@dataclass(frozen=True)
class Parser:
    """A kind's parser: `parse(paths, contents)` -> Arrow rows of `schema` (Spark DDL)
    with at least key, source and error. A content that is an OSError is a file that could not
    be read; the parser gives it a row with the reason."""

    schema: str
    parse: Callable[[list[str], list], pa.RecordBatch | pa.Table]


def list_files(uri: str) -> list[tuple[str, int]]:
    """(URI, size) of every file under `uri` that Spark would read, listed with pyarrow."""
    uri = uri if "://" in uri or uri.startswith("file:") else "file://" + storage.path_of(uri)
    filesystem, root = storage.filesystem(uri)
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else "file://"
    if storage.scheme(uri) in storage.HDFS_SCHEMES:  # its paths leave out the name node: hdfs://host:port
        prefix += uri.split("://", 1)[1].split("/", 1)[0]
    try:
        infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except Exception as exc:  # missing bucket, wrong credentials, no such directory
        raise storage.clear_error(uri, exc) from None
    found = []
    for info in infos:
        relative = info.path[len(root):].lstrip("/")
        hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
        if info.type == fs.FileType.File and not hidden:
            found.append((prefix + info.path if prefix != "file://" else "file:" + info.path, info.size))
    return sorted(found)


def read_parsed(spark, files: list[tuple[str, int]], parser: Parser):
    """The listed files, read and parsed by Spark tasks, as a DataFrame of the parser's schema."""
    return _listing(spark, files).mapInArrow(
        functools.partial(_read_and_parse, parser.parse, arrow_schema(parser.schema)), parser.schema)


def stage_parsed(spark, files: list[tuple[str, int]], parser: Parser, staging: str) -> dict[str, list[str]]:
    """The one pass over the raw data: Spark tasks read and parse their slice of the listing and
    write the rows with pyarrow under `staging`, in `accepted/` (error is null) and `rejected/`,
    plus `sources/` (rows per source file). Returns the files written, by folder: only those of
    tasks that finished, so a retried task's files are never read."""
    written: dict[str, list[str]] = {"accepted": [], "rejected": [], "sources": []}
    stage = functools.partial(_stage_slices, parser.parse, arrow_schema(parser.schema), staging)
    for row in _listing(spark, files).mapInArrow(stage, "folder string, path string").collect():
        written[row["folder"]].append(row["path"])
    return written


def _listing(spark, files: list[tuple[str, int]]):
    slices = _slices(files, 2 * spark.sparkContext.defaultParallelism)
    listing = spark.sparkContext.parallelize(list(enumerate(slices)), max(len(slices), 1))
    return spark.createDataFrame(listing, "slice int, paths array<string>")


@functools.lru_cache(maxsize=None)
def arrow_schema(ddl: str) -> pa.Schema:
    """The Arrow schema of a flat Spark DDL of simple types and arrays of them; no session needed
    (parsers are built where there is none)."""
    from pyspark.sql.pandas.types import to_arrow_schema
    from pyspark.sql.types import StructType

    fields = []
    for part in ddl.split(", "):
        name, kind = part.split(" ", 1)
        kind = {"int": "integer", "bigint": "long"}.get(kind, kind)
        element = kind[6:-1] if kind.startswith("array<") else None
        fields.append({"name": name, "nullable": True, "metadata": {}, "type": {
            "type": "array", "elementType": element, "containsNull": True} if element else kind})
    return to_arrow_schema(StructType.fromJson({"type": "struct", "fields": fields}))


def _slices(files: list[tuple[str, int]], at_least: int) -> list[list[str]]:
    total = sum(max(size, FILE_COST) for _, size in files)
    budget = min(SLICE_BYTES, max(total // max(at_least, 1), FILE_COST))
    slices, current, size = [], [], 0
    for path, nbytes in files:
        current.append(path)
        size += max(nbytes, FILE_COST)
        if size >= budget or len(current) >= SLICE_FILES:
            slices.append(current)
            current, size = [], 0
    return slices + ([current] if current else [])


def _read_and_parse(parse, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for paths in batch.column("paths").to_pylist():
            if not paths:
                continue
            filesystem, _ = storage.filesystem(paths[0])
            for start in range(0, len(paths), READ_CHUNK):
                chunk = paths[start : start + READ_CHUNK]
                out = parse(chunk, [_read(filesystem, path) for path in chunk])
                for part in out.to_batches() if isinstance(out, pa.Table) else [out]:
                    yield part if part.schema.equals(schema) else part.cast(schema)


def _stage_slices(parse, schema: pa.Schema, staging: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    import uuid

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from pyspark import TaskContext

    filesystem, base = storage.filesystem(staging)
    tag = f"{TaskContext.get().partitionId():05d}-{uuid.uuid4().hex}"
    writers, rows = {}, {}

    def write(folder: str, part) -> None:
        if part.num_rows == 0:
            return
        if folder not in writers:
            if storage.scheme(staging) not in storage.S3_SCHEMES:  # object stores have no folders
                filesystem.create_dir(f"{base}/{folder}", recursive=True)
            writers[folder] = pq.ParquetWriter(f"{base}/{folder}/part-{tag}.parquet", part.schema, filesystem=filesystem)
        writers[folder].write_batch(part)

    try:
        for part in _read_and_parse(parse, schema, batches):
            ok = pc.is_null(part.column("error"))
            write("accepted", part.filter(ok))
            write("rejected", part.filter(pc.invert(ok)))
            for item in pc.value_counts(part.column("source")).to_pylist():
                rows[item["values"]] = rows.get(item["values"], 0) + item["counts"]
        if rows:
            write("sources", pa.record_batch({"source": pa.array(list(rows), pa.string()),
                                              "rows": pa.array(list(rows.values()), pa.int64())}))
    finally:
        for writer in writers.values():
            writer.close()
    uri = staging.rstrip("/")
    yield pa.record_batch({"folder": pa.array(list(writers), pa.string()),
                           "path": pa.array([f"{uri}/{folder}/part-{tag}.parquet" for folder in writers], pa.string())})


def _read(filesystem: fs.FileSystem, path: str) -> bytes | OSError:
    try:
        with filesystem.open_input_stream(storage.path_of(path)) as f:
            return f.read()
    except Exception as exc:  # vanished or replaced since the listing; no access any more
        return OSError(f"cannot read file (listed, then not readable: deleted or replaced since?): "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
