"""The Parquet files behind the delta-rs engine, written and read by Spark tasks with pyarrow:
each task writes its rows to one new file and reports it (the driver then commits them all in
one transaction, dlpipe.lake), and a snapshot's files are read where Spark's JVM cannot open
the scheme (s3:// without hadoop-aws)."""

from __future__ import annotations

import json
import uuid
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
from pyspark.sql.types import StructType

from dlpipe import storage


class ParquetFilesDataSource(DataSource):
    """Reads a snapshot's parquet files with pyarrow on the executors, one task per file: for
    tables on a filesystem that Spark's JVM cannot open (s3:// without hadoop-aws)."""

    @classmethod
    def name(cls) -> str:
        return "dlpipe_parquet"

    def reader(self, schema: StructType) -> DataSourceReader:
        return _ParquetReader(json.loads(self.options["files"]))


class _ParquetReader(DataSourceReader):
    def __init__(self, files: list[str]) -> None:
        self.files = files

    def partitions(self) -> list[InputPartition]:
        return [InputPartition(f) for f in self.files]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        fs, path = storage.filesystem(partition.value)
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches()


def write_files(root: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Runs in a Spark task: write its rows to one new parquet file, yield one row about it."""
    from pyspark import TaskContext

    fs, base = storage.filesystem(root)
    name = f"part-{TaskContext.get().partitionId():05d}-{uuid.uuid4()}-c000.snappy.parquet"
    writer, num_records = None, 0
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if writer is None:
                if storage.scheme(root) not in storage.S3_SCHEMES:  # object stores have no folders
                    fs.create_dir(base, recursive=True)
                writer = pq.ParquetWriter(f"{base}/{name}", batch.schema, filesystem=fs)
            writer.write_batch(batch)
            num_records += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # empty partition: no file
        return
    info = fs.get_file_info(f"{base}/{name}")
    stats = json.dumps({"numRecords": num_records})
    yield pa.RecordBatch.from_pylist(
        [{"path": name, "size": info.size, "modification_time": info.mtime_ns // 10**6, "stats": stats}]
    )
