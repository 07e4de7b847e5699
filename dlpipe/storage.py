"""URIs to pyarrow filesystems: local paths, file://, s3:// (AWS variables and profiles,
AWS_ENDPOINT_URL), hdfs://."""

from __future__ import annotations

import os

from pyarrow import fs


def filesystem(uri: str) -> tuple[fs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path."""
    if "://" not in uri:
        uri = "file://" + os.path.abspath(uri)
    return fs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])
