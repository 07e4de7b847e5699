"""Hand-off by reference: a Delta table at one version. The same `TableRef` is what a stage takes
as input, prints, returns in its summary ({"uri", "version"}), logs as an MLflow param and puts in
a registered model's lineage tags (both as "uri@version"). "Latest" is resolved once, at the start
of a stage, and written down."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from dlpipe import lake
from dlpipe.errors import InputNotFound

SPLITS = ("train", "val", "test")


class TableRef(NamedTuple):
    """A Delta table at one version; a tuple (uri, version), so it unpacks and compares as one."""

    uri: str
    version: int

    def __str__(self) -> str:
        return f"{self.uri}@{self.version}"

    def to_dict(self) -> dict:
        return {"uri": self.uri, "version": self.version}

    @classmethod
    def parse(cls, text: str) -> TableRef:
        """`uri@version` (the form of params, tags and `--set score.input=...`)."""
        uri, version = split_spec(text)
        if version is None:
            raise ValueError(f"expected <table uri>@<version>, got {text!r}")
        return cls(uri, version)

    @classmethod
    def of(cls, value) -> TableRef:
        """From a TableRef, a summary's {"uri", "version"} or "uri@version"."""
        if isinstance(value, TableRef):
            return value
        if isinstance(value, dict):
            return cls(value["uri"], int(value["version"]))
        return cls.parse(value)


def split_spec(text: str) -> tuple[str, int | None]:
    """"uri@7" -> (uri, 7); "uri" -> (uri, None) (an '@' inside the URI is kept)."""
    match = re.fullmatch(r"(.+)@(\d+)", text.strip())
    return (match[1], int(match[2])) if match else (text.strip(), None)


def resolve(spec: str, default_uri: str = "", *, key: str = "", hint: str = "run the prepare step first") -> TableRef:
    """The table a stage reads: `spec` is "" (the latest version of default_uri), "uri" (its
    latest version) or "uri@version" (that version, which must exist). `key` names the config
    key in the error when the table or version does not exist."""
    uri, version = split_spec(spec) if spec else (default_uri, None)
    uri = uri if not uri or "://" in uri else os.path.abspath(uri)  # as the lake names local tables
    where = f" (config key '{key}')" if key else ""
    latest = lake.latest_version(uri) if uri else None
    if latest is None:
        raise InputNotFound(f"no Delta table at {uri or '<none given>'}{where}: {hint}")
    if version is None:
        return TableRef(uri, latest)
    if version > latest:
        raise InputNotFound(f"Delta table {uri} has no version {version}{where}; the latest is {latest}")
    return TableRef(uri, version)
