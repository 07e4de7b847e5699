"""Images in class folders -> decoded, normalized rows with a stable train/val/test split."""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

DECODED_SCHEMA = (
    "key string, source string, label int, label_name string, pixels array<float>, "
    "height int, width int, channels int, error string"
)
SPLIT_BUCKETS = 10_000


def decode_images(files: DataFrame, landing_uri: str, classes: list[str], size: int, channels: int) -> DataFrame:
    """Decode on the executors; rows that cannot be used carry the reason in `error`."""
    root = landing_uri.rstrip("/")
    label_of = {name: i for i, name in enumerate(classes)}
    mode = {1: "L", 3: "RGB"}[channels]

    def decode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from PIL import Image, UnidentifiedImageError

        for batch in batches:
            rows = []
            for path, content in zip(batch["path"], batch["content"]):
                key = _relative_key(path, root)
                folder = key.split("/")[0] if "/" in key else ""
                row = {"key": key, "source": path, "label": None, "label_name": folder or None, "pixels": None,
                       "height": size, "width": size, "channels": channels, "error": None}
                if folder not in label_of:
                    row["error"] = f"unknown class folder {folder!r} (expected one of {classes})"
                elif not content:
                    row["error"] = "empty file"
                else:
                    try:
                        with Image.open(io.BytesIO(content)) as image:
                            image = image.convert(mode).resize((size, size))
                            array = np.asarray(image, dtype=np.float32) / 255.0
                        # channels-first, flattened: (C, H, W) -> C*H*W floats in [0, 1]
                        row["pixels"] = array.reshape(size, size, channels).transpose(2, 0, 1).ravel()
                        row["label"] = label_of[folder]
                    except UnidentifiedImageError:  # its message names an in-memory buffer: say it plainly
                        row["error"] = "cannot decode image: UnidentifiedImageError: not an image format Pillow reads"
                    except Exception as exc:  # undecodable input is data, not a crash
                        row["error"] = f"cannot decode image: {type(exc).__name__}: {exc}"
                rows.append(row)
            yield pd.DataFrame(rows, columns=[c.split()[0] for c in DECODED_SCHEMA.split(", ")])

    return files.select("path", "content").mapInPandas(decode, DECODED_SCHEMA)


def _relative_key(path: str, root: str) -> str:
    """The file path relative to the landing root: stable when the landing zone moves."""
    for prefix in (root, "file:" + root, "file://" + root):
        if path.startswith(prefix + "/"):
            return path[len(prefix) + 1 :]
    marker = root.split("://", 1)[-1]
    _, found, rest = path.partition(marker + "/")
    return rest if found else path


def assign_split(df: DataFrame, fractions: dict[str, float]) -> DataFrame:
    """train/val/test from a hash of the key only: re-runs and new files never move a row."""
    bucket = F.pmod(F.xxhash64("key"), F.lit(SPLIT_BUCKETS))
    train_end = round(fractions["train"] * SPLIT_BUCKETS)
    val_end = train_end + round(fractions["val"] * SPLIT_BUCKETS)
    split = F.when(bucket < train_end, "train").when(bucket < val_end, "val").otherwise("test")
    return df.withColumn("split", split)
