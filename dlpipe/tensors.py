"""Tensor columns in the lake. prepare stores `pixels` (images) and `features` (tables) as one
binary value per row: the row's values packed in C order (images channels-first, C x H x W):

    pixels    uint8, the decoded image's bytes; value / 255 gives [0, 1]
    features  float32, little-endian: standardized numbers and one-hot categories

Why bytes and not array<float>: Spark's JVM Parquet writer puts every element of an array through
a per-value path; one binary value per row is written about 5x faster on 2 cores, and an image's
bytes are a quarter of its floats (docs/performance.md, `dlpipe bench prepare`). Petastorm's
ndarray codec stores tensors in Parquet the same way. Readers go through this module:
`lake.read_table` gives Spark the arrays back (array<float>, pixels in [0, 1]) and the training
loader and the driver unpack Arrow columns with numpy. Columns stored as arrays (tables written
before, or by hand) read the same way."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STORED = {"pixels": (np.uint8, 255), "features": (np.float32, None)}  # column -> (stored dtype, divided by)


def pack(name: str, values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """Rows of `values` (n x width, or only the valid rows' when `valid` is given) -> one binary
    value per row in `name`'s stored dtype; rows not valid are null."""
    dtype = STORED[name][0]
    raw = np.ascontiguousarray(values, dtype=dtype).view(np.uint8)
    n = len(valid) if valid is not None else len(values)
    size = raw.size // max(len(values), 1)  # bytes per row
    lengths = np.full(n, size, np.int64) if valid is None else np.where(valid, size, 0)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # Arrow's binary type counts its bytes in int32
        raise ValueError(f"{name}: {offsets[-1]:,} bytes in one batch of {n} rows ({size:,} per row), over the "
                         "2 GiB one Arrow binary column holds per batch")
    offsets = offsets.astype(np.int32)
    validity = None if valid is None or valid.all() else pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(raw.ravel())],
                                 null_count=-1)


def unpack(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array:
    """A stored tensor column -> list<float> (pixels scaled to [0, 1]); an array column as it is."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not _is_binary(column.type):
        return column
    dtype, divisor = STORED.get(name, (np.float32, None))
    offsets, data = _buffers(column)
    flat = data[offsets[0] : offsets[-1]].view(dtype)
    flat = flat.astype(np.float32) / np.float32(divisor) if divisor else flat.astype(np.float32, copy=False)
    itemsize = np.dtype(dtype).itemsize
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]) // itemsize, pa.int32()), pa.array(flat),
                                    mask=column.is_null() if column.null_count else None)


def values(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """Every row's values, flattened into one numpy array (float32 for a stored tensor column)."""
    return pc.list_flatten(unpack(column, name)).to_numpy()


def matrix(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """(rows, values per row): float32 for a stored tensor column, else the arrays' own type."""
    flat = values(column, name)
    rows = len(column)
    if rows and flat.size % rows:
        raise ValueError(f"{name}: rows of different sizes ({flat.size} values in {rows} rows)")
    return flat.reshape(rows, -1 if rows else 0)


def spark_arrays(df):
    """The DataFrame with its stored tensor columns as array<float> (a column expression each:
    a query that does not select the column never unpacks it)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType

    packed = [f.name for f in df.schema.fields if f.name in STORED and isinstance(f.dataType, BinaryType)]
    if not packed:
        return df
    return df.select(*[_spark_unpack(c)(F.col(c)).alias(c) if c in packed else F.col(c) for c in df.columns])


def _spark_unpack(name: str):
    from pyspark.sql.functions import arrow_udf

    def unpack_column(column: pa.Array) -> pa.Array:
        return unpack(column, name)

    return arrow_udf(unpack_column, "array<float>")


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_)


def _buffers(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets of this slice's rows, the data buffer) of a binary array, without copying."""
    _, offsets, data = column.buffers()
    width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(offsets, width)[column.offset : column.offset + len(column) + 1].astype(np.int64)
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
