"""The one train/val/test split of every data kind: a function of a key column only, so re-runs,
new files and a moved landing zone never move a row from one table to another.

Two forms of the same function: `hash_split` (a Spark column) and `hash_split_arrow` (Arrow, in
Python, for a parser's Spark task). Both bucket Spark's xxhash64 (seed 42) of the key's UTF-8
bytes, so a key gets the same split from either (tests/test_pipelines_table.py checks it)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

SPLIT_BUCKETS = 10_000
SPLITS = ("train", "val", "test")
SEED = 42  # Spark's xxhash64 seed


def _ends(fractions: dict[str, float]) -> tuple[int, int]:
    train_end = round(fractions["train"] * SPLIT_BUCKETS)
    return train_end, train_end + round(fractions["val"] * SPLIT_BUCKETS)


def hash_split(df: DataFrame, fractions: dict[str, float], column: str = "key") -> DataFrame:
    """Adds `split` (train/val/test) from xxhash64(`column`) in SPLIT_BUCKETS buckets; the first
    fractions["train"] of the buckets are train, the next fractions["val"] val, the rest test."""
    bucket = F.pmod(F.xxhash64(column), F.lit(SPLIT_BUCKETS))
    train_end, val_end = _ends(fractions)
    return df.withColumn("split", F.when(bucket < train_end, "train").when(bucket < val_end, "val").otherwise("test"))


def key_hashes(keys: pa.Array) -> np.ndarray:
    """Spark's xxhash64 (seed 42) of each key's UTF-8 bytes, as int64 (a null key hashes to the seed)."""
    import xxhash

    hashes = np.fromiter((SEED if k is None else xxhash.xxh64_intdigest(k, SEED) for k in keys.cast(pa.binary()).to_pylist()),
                         np.uint64, len(keys))
    return hashes.view(np.int64)


def hash_split_arrow(keys: pa.Array, fractions: dict[str, float]) -> pa.Array:
    """hash_split for an Arrow string array: the split of each key."""
    bucket = key_hashes(keys) % SPLIT_BUCKETS  # numpy's % of a positive divisor is Spark's pmod
    train_end, val_end = _ends(fractions)
    names = np.array(SPLITS, dtype=object)
    return pa.array(names[(bucket >= train_end).astype(np.int8) + (bucket >= val_end)], pa.string())
