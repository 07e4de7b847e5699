"""data.kind: images -> <name>_train/_val/_test with key, source, label, label_name, pixels,
height, width, channels (pipelines.images does the decoding)."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.images import decode_images
from pipelines.split import hash_split

BASE = ("train", "val", "test")
STATE = None
UNIT = "files"


def parse(files: DataFrame, data, root: str, state) -> DataFrame:
    d = data
    return decode_images(files, root, d.classes, d.image_size, d.channels).withColumn("row", F.lit(None).cast("long"))


def assign_split(df: DataFrame, data) -> DataFrame:
    return hash_split(df, data.split_fractions)


def to_base(accepted: DataFrame, data, state) -> DataFrame:
    return accepted.drop("row")


def derive(tables: dict, data, state) -> dict:
    return {}
