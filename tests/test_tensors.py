"""dlpipe/tensors.py: tensor rows stored as one binary value each, read back as they were written,
and a batch too large for Arrow's binary offsets refused in one line instead of wrapping around."""

import numpy as np
import pytest

from dlpipe import tensors


def test_packed_rows_read_back_with_the_invalid_rows_null():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    column = tensors.pack("features", x[[0, 2]], np.array([True, False, True]))
    assert column.null_count == 1 and column.is_null().to_pylist() == [False, True, False]
    back = tensors.unpack(column, "features").to_pylist()
    assert back[0] == x[0].tolist() and back[1] is None and back[2] == x[2].tolist()


def test_a_batch_over_2_gib_is_refused_not_wrapped():
    rows = np.zeros((2, 300_000_000), np.float32)  # 2.4 GB, never touched: the pages are not allocated
    with pytest.raises(ValueError, match=r"features: 2,400,000,000 bytes in one batch of 2 rows \(1,200,000,000 per row\)"):
        tensors.pack("features", rows)
