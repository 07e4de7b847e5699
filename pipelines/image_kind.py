"""data.kind: images -> <name>_train/_val/_test with key, source, label, label_name, pixels,
height, width, channels (pipelines.images does the decoding)."""

from __future__ import annotations

from pyspark.sql import DataFrame

from pipelines.images import image_parser
from pipelines.sources import Parser, split_by_key

BASE = ("train", "val", "test")
STATE = None
UNIT = "files"
UNIQUE_KEYS = True  # one row per file, keyed by its path: no key can repeat within a job


def parser(data, root: str, state) -> Parser:
    return split_by_key(image_parser(root, data.classes, data.image_size, data.channels), data.split_fractions)


def assign_split(df: DataFrame, data) -> DataFrame:
    return df  # the parser gave every row its split (pipelines.sources.split_by_key)


def to_base(accepted: DataFrame, data, state) -> DataFrame:
    return accepted.drop("row")


def derive(tables: dict, data, state) -> dict:
    return {}
