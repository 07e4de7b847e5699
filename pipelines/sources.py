"""Raw files under a landing URI as a DataFrame of (path, content): the one way every pipeline
reads its source, whatever the scheme (local path, file://, hdfs://, s3://, s3a://)."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession


def read_files(spark: SparkSession, landing_uri: str) -> DataFrame:
    """Every file under the landing URI as (path, content); hidden and _-prefixed files are
    skipped, as Spark does. Spark's file scan silently drops zero-byte files, so they are
    listed here (with pyarrow's filesystems) and come back with empty content, to be rejected."""
    files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(landing_uri)
    empty = [(path, b"") for path in _zero_byte_files(landing_uri)]
    files = files.select("path", "content")
    if empty:
        files = files.unionByName(spark.createDataFrame(empty, "path string, content binary"))
    return files


def _zero_byte_files(landing_uri: str) -> list[str]:
    from pyarrow import fs

    from dlpipe.storage import filesystem

    landing_fs, root = filesystem(landing_uri)
    found = []
    for info in landing_fs.get_file_info(fs.FileSelector(root, recursive=True)):
        relative = info.path[len(root):].lstrip("/")
        hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
        if info.type == fs.FileType.File and info.size == 0 and not hidden:
            scheme = landing_uri.split("://", 1)[0] if "://" in landing_uri else "file"
            found.append(f"file:{info.path}" if scheme == "file" else f"{scheme}://{info.path}")
    return found
