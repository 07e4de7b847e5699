"""Raw files under a landing URI as a DataFrame of (path, content): the one way every pipeline
reads its source, whatever the scheme (local path, file://, hdfs://, s3://, s3a://).

Spark's own binaryFile reader is used when the JVM has a Hadoop FileSystem for the scheme (local
files always; hdfs:// and s3a:// on clusters with their connectors). Otherwise (s3:// from a plain
pip install, without the hadoop-aws jar) the driver lists the files with pyarrow and the executors
read them with pyarrow in a Spark Python data source, each task a slice of the file list.
Either way hidden and _-prefixed files and folders are skipped, as Spark does, and zero-byte files
come back with empty content (Spark's file scan drops them; we keep them so they get rejected).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition

from dlpipe import storage

FILES_SCHEMA = "path string, content binary"
SOURCE_NAME = "dlpipe_files"


def read_files(spark: SparkSession, landing_uri: str) -> DataFrame:
    """Every file under the landing URI as (path, content)."""
    uri = landing_uri if "://" in landing_uri else "file://" + os.path.abspath(landing_uri)
    spark_uri = storage.spark_uri(spark, uri)
    if spark_uri is None:
        files = list_files(uri)
        if not files:
            raise FileNotFoundError(f"no files under {landing_uri}")
        spark.dataSource.register(FilesDataSource)
        return spark.read.format(SOURCE_NAME).option("files", json.dumps(files)).load()
    try:
        found = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(spark_uri)
        empty = [(path, b"") for path in _zero_byte_files(spark, spark_uri)]
    except (AnalysisException, Py4JJavaError) as exc:  # no bucket, access denied, no such folder
        raise storage.clear_error(landing_uri, exc) from None
    found = found.select("path", "content")
    if empty:
        found = found.unionByName(spark.createDataFrame(empty, FILES_SCHEMA))
    return found


def list_files(uri: str) -> list[tuple[str, int]]:
    """(URI, size) of every file under `uri` that Spark would read, listed with pyarrow."""
    from pyarrow import fs

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


class FilesDataSource(DataSource):
    """`spark.read.format("dlpipe_files").option("files", json [[uri, size], ...])`: reads the
    listed files with pyarrow on the executors, about `partitionBytes` per task."""

    @classmethod
    def name(cls) -> str:
        return SOURCE_NAME

    def schema(self) -> str:
        return FILES_SCHEMA

    def reader(self, schema) -> DataSourceReader:
        return _FilesReader(json.loads(self.options["files"]), int(self.options.get("partitionBytes", 32 << 20)))


class _FilesReader(DataSourceReader):
    def __init__(self, files: list[list], partition_bytes: int) -> None:
        self.files, self.partition_bytes = files, partition_bytes

    def partitions(self) -> list[InputPartition]:
        """Consecutive slices of the list, each about partition_bytes (a file costs at least
        16 KiB, as with spark.sql.files.openCostInBytes), at least 2 and at most 1000 files."""
        parts, current, size = [], [], 0
        for path, nbytes in self.files:
            current.append(path)
            size += max(nbytes, 16384)
            if size >= self.partition_bytes or len(current) >= 1000:
                parts.append(InputPartition(current))
                current, size = [], 0
        if current:
            parts.append(InputPartition(current))
        if len(parts) == 1 and len(parts[0].value) > 1:
            paths = parts[0].value
            parts = [InputPartition(paths[: len(paths) // 2]), InputPartition(paths[len(paths) // 2 :])]
        return parts

    def read(self, partition: InputPartition) -> Iterator:
        import pyarrow as pa

        paths = partition.value
        filesystem, _ = storage.filesystem(paths[0])
        for start in range(0, len(paths), 64):
            chunk = paths[start : start + 64]
            contents = []
            for path in chunk:
                try:
                    with filesystem.open_input_stream(storage.path_of(path)) as f:
                        contents.append(f.read())
                except Exception as exc:
                    raise storage.clear_error(path, exc) from None
            yield pa.RecordBatch.from_arrays([pa.array(chunk, pa.string()), pa.array(contents, pa.binary())],
                                             names=["path", "content"])


def _zero_byte_files(spark: SparkSession, uri: str) -> list[str]:
    """Zero-byte files that Spark's scan drops; listed with pyarrow, or with the JVM's Hadoop
    FileSystem where pyarrow cannot open the scheme (e.g. HDFS without libhdfs)."""
    try:
        storage.filesystem(uri)
    except Exception:
        return _zero_byte_files_jvm(spark, uri)
    return [path for path, size in list_files(uri) if size == 0]


def _zero_byte_files_jvm(spark: SparkSession, uri: str) -> list[str]:
    jvm = spark._jvm
    root = jvm.org.apache.hadoop.fs.Path(uri)
    hadoop_fs = root.getFileSystem(spark._jsc.hadoopConfiguration())
    found, files = [], hadoop_fs.listFiles(root, True)
    prefix = hadoop_fs.makeQualified(root).toString().rstrip("/")
    while files.hasNext():
        status = files.next()
        path = status.getPath().toString()
        hidden = any(part.startswith((".", "_")) for part in path[len(prefix):].strip("/").split("/"))
        if status.getLen() == 0 and not hidden:
            found.append(path)
    return found
