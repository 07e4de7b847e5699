"""The one train/val/test split of every data kind: a function of a key column only, so re-runs,
new files and a moved landing zone never move a row from one table to another."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

SPLIT_BUCKETS = 10_000
SPLITS = ("train", "val", "test")


def hash_split(df: DataFrame, fractions: dict[str, float], column: str = "key") -> DataFrame:
    """Adds `split` (train/val/test) from xxhash64(`column`) in SPLIT_BUCKETS buckets; the first
    fractions["train"] of the buckets are train, the next fractions["val"] val, the rest test."""
    bucket = F.pmod(F.xxhash64(column), F.lit(SPLIT_BUCKETS))
    train_end = round(fractions["train"] * SPLIT_BUCKETS)
    val_end = train_end + round(fractions["val"] * SPLIT_BUCKETS)
    return df.withColumn("split", F.when(bucket < train_end, "train").when(bucket < val_end, "val").otherwise("test"))
