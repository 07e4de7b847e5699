"""Images in class folders -> decoded, normalized rows with a stable train/val/test split."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from dlpipe import tensors
from pipelines.sources import Parser

DECODED_SCHEMA = (
    "key string, source string, label int, label_name string, pixels binary, "
    "height int, width int, channels int, error string"
)


def image_parser(landing_uri: str, classes: list[str], size: int, channels: int) -> Parser:
    """Decode in the Spark task that read the files; rows that cannot be used carry the reason in
    `error`. Pixels are stored as the decoded bytes (dlpipe.tensors: uint8, channels-first; readers
    get floats in [0, 1]); the pixels of a batch go out as one buffer, not one object per image."""
    root = landing_uri.rstrip("/")
    label_of = {name: i for i, name in enumerate(classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    values = size * size * channels

    def decode(paths: list[str], contents: list) -> pa.RecordBatch:
        from PIL import Image, UnidentifiedImageError

        keys, labels, names, errors, pixels, valid = [], [], [], [], [], []
        for path, content in zip(paths, contents):
            key = relative_key(path, root)
            folder = key.split("/")[0] if "/" in key else ""
            label, error = None, None
            if folder not in label_of:
                error = f"unknown class folder {folder!r} (expected one of {classes})"
            elif isinstance(content, OSError):
                error = str(content)
            elif not content:
                error = "empty file"
            else:
                try:
                    with Image.open(io.BytesIO(content)) as image:
                        image = image.convert(mode).resize((size, size))
                        array = np.asarray(image, dtype=np.uint8)
                    # channels-first, flattened: (C, H, W) -> C*H*W bytes
                    pixels.append(array.reshape(size, size, channels).transpose(2, 0, 1).ravel())
                    label = label_of[folder]
                except UnidentifiedImageError:  # its message names an in-memory buffer: say it plainly
                    error = "cannot decode image: UnidentifiedImageError: not an image format Pillow reads"
                except Exception as exc:  # undecodable input is data, not a crash
                    error = f"cannot decode image: {type(exc).__name__}: {exc}"
            keys.append(key)
            labels.append(label)
            names.append(folder or None)
            errors.append(error)
            valid.append(error is None)
        flat = np.concatenate(pixels) if pixels else np.zeros(0, np.uint8)
        n = len(keys)
        return pa.RecordBatch.from_arrays(
            [pa.array(keys, pa.string()), pa.array(paths, pa.string()), pa.array(labels, pa.int32()),
             pa.array(names, pa.string()),
             tensors.pack("pixels", flat.reshape(-1, values), np.array(valid, bool)),
             pa.array([size] * n, pa.int32()), pa.array([size] * n, pa.int32()),
             pa.array([channels] * n, pa.int32()), pa.array(errors, pa.string())],
            names=[c.split()[0] for c in DECODED_SCHEMA.split(", ")],
        )

    return Parser(DECODED_SCHEMA, decode, unique_keys=True)  # keyed by path


def relative_key(path: str, root: str) -> str:
    """The file path relative to the landing root: stable when the landing zone moves."""
    for prefix in (root, "file:" + root, "file://" + root):
        if path.startswith(prefix + "/"):
            return path[len(prefix) + 1 :]
    marker = root.split("://", 1)[-1]
    _, found, rest = path.partition(marker + "/")
    return rest if found else path
