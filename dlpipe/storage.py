"""URIs to pyarrow filesystems and delta-rs storage options: local paths, file://, hdfs://,
s3:// and s3a://.

S3 credentials come from where the AWS SDKs look for them (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, instance roles), the region from
AWS_REGION or AWS_DEFAULT_REGION, and an S3-compatible server from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL. No secret is ever copied into a URI, an option or a message: the SDKs read them
where they are, on the driver and on each executor.

HDFS (hdfs://, viewfs://) is reached without a JVM and without libhdfs: through the pure-Rust
client of the hdfs-native package, as a pyarrow filesystem. It reads the cluster's settings from
HADOOP_CONF_DIR (core-site.xml, hdfs-site.xml: name services, HA, Kerberos) like Hadoop does.
"""

from __future__ import annotations

import os
import re

from pyarrow import fs

S3_SCHEMES = ("s3", "s3a")
HDFS_SCHEMES = ("hdfs", "viewfs")


def scheme(uri: str) -> str:
    """The URI scheme; 'file' for a plain local path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def filesystem(uri: str) -> tuple[fs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path."""
    if scheme(uri) in S3_SCHEMES:
        return _s3(), path_of(uri)
    if scheme(uri) == "file":
        return fs.LocalFileSystem(), path_of(uri)
    if scheme(uri) in HDFS_SCHEMES:
        return _hdfs(uri), path_of(uri)
    return fs.FileSystem.from_uri(uri)


def path_of(uri: str) -> str:
    """The path inside the filesystem that filesystem(uri) returns, without building that filesystem."""
    if uri.startswith("file:"):  # file:///a/b and Spark's file:/a/b
        return "/" + uri[5:].lstrip("/")
    if "://" not in uri:
        return os.path.abspath(uri)
    rest = uri.split("://", 1)[1]
    if scheme(uri) in S3_SCHEMES:
        return rest.rstrip("/")
    return "/" + rest.split("/", 1)[1] if "/" in rest else "/"  # hdfs://host:port/path -> /path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def spark_uri(spark, uri: str) -> str | None:
    """The URI as Spark's JVM reads it (s3:// as s3a:// where only S3A is there), or None when
    the JVM has no Hadoop FileSystem for the scheme (then dlpipe reads it with pyarrow)."""
    jvm = getattr(spark, "_jvm", None)  # Spark Connect sessions have no JVM handle
    if jvm is None:
        return None
    given = scheme(uri)
    conf = spark._jsc.hadoopConfiguration()
    for candidate in [given] + (["s3a"] if given == "s3" else []):
        try:
            jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass(candidate, conf)
        except Exception:  # UnsupportedFileSystemException: no connector on the classpath
            continue
        return uri if candidate == given or "://" not in uri else candidate + uri[len(given):]
    return None


def spark_s3_conf() -> dict[str, str]:
    """Hadoop S3A settings for Spark (hadoop-aws on the classpath): s3:// read through S3A as s3a://
    is, the endpoint and region from the same variables as above. No credential: S3A's default
    provider chain reads the AWS variables, profiles and instance roles on the driver and on every
    executor."""
    conf = {"spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
            "spark.hadoop.fs.s3a.endpoint.region": _region(),
            "spark.hadoop.fs.s3a.create.conditional.enabled": "true"}  # If-None-Match puts for Delta commits
    endpoint = _endpoint()
    if endpoint:  # an S3-compatible server (MinIO, moto, Ceph): path-style bucket addressing
        conf["spark.hadoop.fs.s3a.endpoint"] = endpoint
        conf["spark.hadoop.fs.s3a.path.style.access"] = "true"
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(endpoint.startswith("https://")).lower()
    return conf


def delta_options(uri: str) -> dict[str, str] | None:
    """delta-rs storage options for a table URI: where the S3 server is, never the credentials
    (delta-rs reads those from the same variables and profiles itself). Commits to S3 need no
    lock: delta-rs 1.x writes each log entry with a conditional put (If-None-Match)."""
    if scheme(uri) not in S3_SCHEMES:
        return None
    options = {"AWS_REGION": _region()}
    endpoint = _endpoint()
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    return options


def clear_error(uri: str, exc: BaseException) -> OSError:
    """An error naming the URI and what to check, in place of an SDK's or the JVM's trace."""
    text = str(exc)
    where = f" (endpoint {_endpoint()})" if scheme(uri) in S3_SCHEMES and _endpoint() else ""
    if re.search(r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist", text, re.I):
        bucket = uri.split("://", 1)[-1].split("/", 1)[0]
        return FileNotFoundError(f"cannot access {uri}: bucket {bucket!r} does not exist{where}")
    if re.search(r"ACCESS_DENIED|AccessDenied|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|"
                 r"InvalidAccessKeyId|INVALID_ACCESS_KEY|Forbidden|\b403\b", text):
        return PermissionError(
            f"cannot access {uri}: access denied{where}; check the credentials (AWS_ACCESS_KEY_ID, "
            f"AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE) and their permissions on it"
        )
    if isinstance(exc, FileNotFoundError) or re.search(r"Path does not exist|PATH_NOT_FOUND|NotFound", text):
        return FileNotFoundError(f"cannot access {uri}: no such file or directory{where}")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return OSError(f"cannot access {uri}{where}: {first[:300]}")


def storage_error(uri: str, exc: BaseException) -> OSError | None:
    """clear_error(uri, exc) when the JVM's exception is about reaching the storage (no bucket, access
    denied, no such path), else None: a failed task or a bad row is not a storage problem."""
    error = clear_error(uri, exc)
    return None if type(error) is OSError else error


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _s3() -> fs.S3FileSystem:
    endpoint = _endpoint()
    return fs.S3FileSystem(
        region=_region(),
        endpoint_override=endpoint,
        scheme="http" if endpoint and endpoint.startswith("http://") else "https",
    )


def _hdfs(uri: str) -> fs.PyFileSystem:
    """hdfs-native's fsspec filesystem for the URI's name node (or name service; none: the
    configured fs.defaultFS) as a pyarrow filesystem; one client per name node and process."""
    from urllib.parse import urlsplit

    try:
        from hdfs_native.fsspec import HdfsFileSystem, ViewfsFileSystem
    except ImportError:
        raise ImportError(f"cannot access {uri}: hdfs:// needs the hdfs-native package (pip install hdfs-native)") from None
    parts = urlsplit(uri)
    kind = ViewfsFileSystem if scheme(uri) == "viewfs" else HdfsFileSystem
    key = (os.getpid(), kind.protocol, parts.hostname, parts.port)
    if key not in _HDFS_CLIENTS:
        _HDFS_CLIENTS[key] = kind(host=parts.hostname, port=parts.port, skip_instance_cache=True)
    return fs.PyFileSystem(_HdfsHandler(_HDFS_CLIENTS[key]))


# Every hdfs-native client this process made, its parent's included, kept for the life of the
# process. A client owns a tokio runtime; dropping one in a forked child (where the runtime's
# threads did not survive the fork) blocks forever. fsspec empties its own instance cache in every
# forked child (os.register_at_fork), which is that drop, and so hung the fork of a subprocess
# started with a preexec_fn (pyspark starting its JVM): its cache is skipped and ours never emptied.
_HDFS_CLIENTS: dict[tuple, object] = {}


class _HdfsHandler(fs.FSSpecHandler):
    """fsspec's handler with pyarrow's semantics where hdfs-native's differ: modification times
    (FileInfo.mtime), and move() replacing an existing destination file."""

    @staticmethod
    def _create_file_info(path, info):
        from datetime import datetime, timezone

        directory = info["type"] == "directory"
        millis = info.get("modification_time")
        return fs.FileInfo(path, fs.FileType.Directory if directory else fs.FileType.File,
                           size=None if directory else info["size"],
                           mtime=None if millis is None else datetime.fromtimestamp(millis / 1000, timezone.utc))

    def move(self, src, dest):
        self.fs.mv(src, dest, overwrite=True)
