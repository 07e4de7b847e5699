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

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyarrow import fs

from dlpipe import storage
from pipelines.split import hash_split_arrow, key_hashes

FILE_COST = 16 << 10  # a file costs at least this many bytes when slicing (Spark's openCostInBytes idea)
SLICE_BYTES = 64 << 20
SLICE_FILES = 5000
READ_CHUNK = 256  # files handed to the parser at once


@dataclass(frozen=True)
class Parser:
    """A kind's parser: `parse(paths, contents)` -> Arrow rows of `schema` (Spark DDL)
    with at least key, source and error. A content that is an OSError is a file that could not
    be read; the parser gives it a row with the reason. `part`, where given, is run on every
    batch of accepted rows in the same task (a kind's part of its fitted state). `unique_keys`:
    no key can repeat (one row per file), so the staging tasks do not hash them."""

    schema: str
    parse: Callable[[list[str], list], pa.RecordBatch | pa.Table]
    part: Callable[[pa.RecordBatch], pa.RecordBatch] | None = None
    unique_keys: bool = False


def split_by_key(parser: Parser, fractions: dict[str, float]) -> Parser:
    """The parser, with each row's split (pipelines.split.hash_split_arrow of its key) given in the
    task that parsed it: the staging tasks then write each split's accepted rows apart."""
    def parse(paths: list[str], contents: list) -> pa.Table:
        table = parser.parse(paths, contents)
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        return table.append_column("split", hash_split_arrow(table.column("key"), fractions))

    return dataclasses.replace(parser, schema=parser.schema + ", split string", parse=parse)


def list_files(uri: str) -> list[tuple[str, int]]:
    """(URI, size) of every file under `uri` that Spark would read, listed with pyarrow."""
    uri = uri if "://" in uri or uri.startswith("file:") else "file://" + storage.path_of(uri)
    filesystem, root = storage.filesystem(uri)
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else "file://"
    if storage.scheme(uri) in storage.HDFS_SCHEMES:  # its paths leave out the name node: hdfs://host:port
        prefix += uri.split("://", 1)[1].split("/", 1)[0]
    try:
        if storage.scheme(uri) == "file":
            return _list_local(root)
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


def _list_local(root: str) -> list[tuple[str, int]]:
    """list_files of a local folder with os.scandir: a quarter less time than pyarrow's listing for
    a million small files (docs/performance.md). Links to files are followed, links to folders not."""
    found, folders = [], [root.rstrip("/") or "/"]
    if not os.path.isdir(folders[0]):
        os.scandir(folders[0]).close()  # the error of a missing folder or of a file, as os names it
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.name.startswith((".", "_")):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file():
                    found.append(("file:" + entry.path, entry.stat().st_size))
    return sorted(found)


def read_parsed(spark, files: list[tuple[str, int]], parser: Parser):
    """The listed files, read and parsed by Spark tasks, as a DataFrame of the parser's schema."""
    return _listing(spark, files).mapInArrow(
        functools.partial(_read_and_parse, parser.parse, arrow_schema(parser.schema)), parser.schema)


def stage_parsed(spark, files: list[tuple[str, int]], parser: Parser, staging: str) -> dict[str, list[str]]:
    """The one pass over the raw data: Spark tasks read and parse their slice of the listing and
    write the rows with pyarrow under `staging`, in `accepted/` (error is null) and `rejected/`,
    (`accepted/<split>/` where the parser gives each row its split: split_by_key), plus `sources/`
    (rows per source file), `keys/` (pipelines.split.key_hashes of the accepted rows' keys) and
    `parts/` (the parser's `part` of each batch of accepted rows). Returns the files written, by
    folder: only those of tasks that finished, so a retried task's files are never read."""
    written: dict[str, list[str]] = {"accepted": [], "rejected": [], "sources": [], "keys": [], "parts": []}
    stage = functools.partial(_stage_slices, parser, arrow_schema(parser.schema), staging)
    for row in _listing(spark, files).mapInArrow(stage, PARTS_SCHEMA).collect():
        if row["folder"].startswith("accepted/"):  # accepted/<split>: also under accepted
            written.setdefault(row["folder"], []).append(row["path"])
            written["accepted"].append(row["path"])
        else:
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


ROW_GROUP_BYTES = 16 << 20  # staged rows are buffered into row groups of about this size


class _Parts:
    """This task's Parquet files under `staging`: one per folder, part-<task>-<uuid>.parquet, its
    rows buffered into row groups of about ROW_GROUP_BYTES (a parser's batches are small: a few
    hundred images, and a split's share of them fewer; tiny row groups are slow to read back)."""

    def __init__(self, staging: str):
        import uuid

        from pyspark import TaskContext

        self.staging, (self.filesystem, self.base) = staging.rstrip("/"), storage.filesystem(staging)
        self.tag = f"{TaskContext.get().partitionId():05d}-{uuid.uuid4().hex}"
        self.writers, self.rows, self.pending = {}, {}, {}

    def write(self, folder: str, part) -> None:
        if part.num_rows == 0:
            return
        pending = self.pending.setdefault(folder, [0, []])
        pending[0] += part.nbytes
        pending[1].append(pa.Table.from_batches([part]) if isinstance(part, pa.RecordBatch) else part)
        self.rows[folder] = self.rows.get(folder, 0) + part.num_rows
        if pending[0] >= ROW_GROUP_BYTES:
            self._flush(folder)

    def _flush(self, folder: str) -> None:
        import pyarrow.parquet as pq

        _, tables = self.pending.pop(folder, (0, []))
        if not tables:
            return
        table = pa.concat_tables(tables)
        if folder not in self.writers:
            if storage.scheme(self.staging) not in storage.S3_SCHEMES:  # object stores have no folders
                self.filesystem.create_dir(f"{self.base}/{folder}", recursive=True)
            self.writers[folder] = pq.ParquetWriter(f"{self.base}/{folder}/part-{self.tag}.parquet", table.schema,
                                                    filesystem=self.filesystem)
        self.writers[folder].write_table(table, row_group_size=table.num_rows)

    def close(self) -> pa.RecordBatch:
        """Writes what is buffered and closes the files; (folder, path, rows) of each."""
        try:
            for folder in list(self.pending):
                self._flush(folder)
        finally:
            for writer in self.writers.values():
                writer.close()
        folders = list(self.writers)
        return pa.record_batch({"folder": pa.array(folders, pa.string()),
                                "path": pa.array([f"{self.staging}/{f}/part-{self.tag}.parquet" for f in folders], pa.string()),
                                "rows": pa.array([self.rows[f] for f in folders], pa.int64())})


PARTS_SCHEMA = "folder string, path string, rows long"


def _stage_slices(parser: Parser, schema: pa.Schema, staging: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    import pyarrow.compute as pc

    parts, rows = _Parts(staging), {}
    try:
        for part in _read_and_parse(parser.parse, schema, batches):
            ok = pc.is_null(part.column("error"))
            accepted = part.filter(ok)
            if "split" in accepted.column_names:  # each split apart: a table write reads only its own
                for split in pc.unique(accepted.column("split")).to_pylist():
                    parts.write(f"accepted/{split}", accepted.filter(pc.equal(accepted.column("split"), split)))
            else:
                parts.write("accepted", accepted)
            parts.write("rejected", part.filter(pc.invert(ok)))
            if accepted.num_rows and not parser.unique_keys:  # for prepare's check for repeated keys
                parts.write("keys", pa.record_batch({"hash": key_hashes(accepted.column("key"))}))
            if parser.part is not None and accepted.num_rows:
                parts.write("parts", parser.part(accepted))
            for item in pc.value_counts(part.column("source")).to_pylist():
                rows[item["values"]] = rows.get(item["values"], 0) + item["counts"]
        if rows:
            parts.write("sources", pa.record_batch({"source": pa.array(list(rows), pa.string()),
                                                    "rows": pa.array(list(rows.values()), pa.int64())}))
    finally:
        done = parts.close()
    yield done


def _staged_units(spark, files: list[str]):
    """The row groups of the staged Parquet `files`, cut evenly by rows into 4 Spark tasks per core:
    a DataFrame `slice int, units string` (a JSON list of [file, row group])."""
    import json

    import pyarrow.parquet as pq

    groups = []
    for path in files:
        filesystem, name = storage.filesystem(path)
        with filesystem.open_input_file(name) as f:
            meta = pq.ParquetFile(f).metadata
        groups += [(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    tasks = max(1, min(len(groups), 4 * spark.sparkContext.defaultParallelism))
    share, slices, current, size = sum(g[2] for g in groups) / tasks, [], [], 0
    for group in groups:
        current.append(group[:2])
        size += group[2]
        if size >= share * (len(slices) + 1) and len(slices) < tasks - 1:
            slices.append(current)
            current = []
    slices += [current] if current else []
    listing = spark.sparkContext.parallelize([(i, json.dumps(s)) for i, s in enumerate(slices)], max(len(slices), 1))
    return spark.createDataFrame(listing, "slice int, units string")


def read_staged(files: list[str], schema: str):
    """Small staged files (the parser's parts) as one pandas DataFrame, read on the driver."""
    import pyarrow.parquet as pq

    tables = []
    for path in files:
        filesystem, name = storage.filesystem(path)
        tables.append(pq.read_table(name, filesystem=filesystem))
    return (pa.concat_tables(tables) if tables else arrow_schema(schema).empty_table()).to_pandas()


DROP_COLUMNS = ["key", "source", "row"]


def _staged_batches(drop: str | None, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """In a Spark task: the staged rows of its row groups, less the rows listed in the Parquet
    file `drop` (key, source, row)."""
    import json

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    dropped = None
    if drop:
        filesystem, name = storage.filesystem(drop)
        dropped = pq.read_table(name, filesystem=filesystem, columns=DROP_COLUMNS)
        dropped = dropped.set_column(2, "row", pc.fill_null(dropped.column("row"), -1))  # images have no row
    for batch in batches:
        for units in batch.column("units").to_pylist():
            for path, group in json.loads(units):
                filesystem, name = storage.filesystem(path)
                with filesystem.open_input_file(name) as f:
                    staged = pq.ParquetFile(f).read_row_group(group)
                if dropped is not None and len(dropped):  # joined on the keys alone: a join cannot carry lists
                    keys = pa.table({"key": staged.column("key"), "source": staged.column("source"),
                                     "row": pc.fill_null(staged.column("row"), -1), "_at": pa.array(range(len(staged)))})
                    keep = keys.join(dropped, DROP_COLUMNS, join_type="left anti").column("_at")
                    staged = staged.take(np.sort(keep.to_numpy()))  # in the staged order
                yield from staged.to_batches()


def scan_staged(spark, files: list[str], fn: Callable[[pa.RecordBatch], pa.RecordBatch], schema: str,
                drop: str | None = None):
    """A DataFrame of `schema`: `fn` of the staged rows in `files` (less those listed in the
    Parquet file `drop`), run in Python in Spark tasks that read the files with pyarrow. The
    staged columns never take Spark's row format, which costs more than `fn` for columns of
    arrays (docs/performance.md)."""
    def task(batches):
        return map(fn, _staged_batches(drop, batches))

    return _staged_units(spark, files).mapInArrow(task, schema)


def map_staged(spark, files: list[str], fn: Callable[[pa.RecordBatch], pa.RecordBatch], out: str,
               drop: str | None = None) -> tuple[dict[str, list[str]], dict[str, int]]:
    """As scan_staged, with `fn` giving rows with a `split` column: each split's rows are written
    under `out`/<split>/ with pyarrow. Returns (the files written, by split; rows, by split)."""
    written: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    task = functools.partial(_map_slices, fn, out, drop)
    for row in _staged_units(spark, files).mapInArrow(task, PARTS_SCHEMA).collect():
        written.setdefault(row["folder"], []).append(row["path"])
        rows[row["folder"]] = rows.get(row["folder"], 0) + row["rows"]
    return written, rows


def _map_slices(fn, out: str, drop: str | None, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    import pyarrow.compute as pc

    parts = _Parts(out)
    try:
        for rows in map(fn, _staged_batches(drop, batches)):
            for split in pc.unique(rows.column("split")).to_pylist():
                parts.write(split, rows.filter(pc.equal(rows.column("split"), split)))
    finally:
        done = parts.close()
    yield done


def _read(filesystem: fs.FileSystem, path: str) -> bytes | OSError:
    try:
        with filesystem.open_input_stream(storage.path_of(path)) as f:
            return f.read()
    except Exception as exc:  # vanished or replaced since the listing; no access any more
        return OSError(f"cannot read file (listed, then not readable: deleted or replaced since?): "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
