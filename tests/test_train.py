import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dl.models import CNN, CNNConfig
from dl.train import FitConfig, fit
from dlpipe.launch import load_shard


def _blobs(n, seed):
    """Two classes a CNN can tell apart: a bright square top-left vs bottom-right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.2, (n, 1, 12, 12)).astype(np.float32)
    for i, label in enumerate(y):
        r = slice(0, 5) if label == 0 else slice(7, 12)
        x[i, 0, r, r] += 0.8
    return x, y


def test_cnn_shapes_and_bad_size():
    model = CNN(CNNConfig(in_channels=3, image_size=20, num_classes=7, conv_channels=(4, 8)))
    assert model(torch.zeros(5, 3, 20, 20)).shape == (5, 7)
    with pytest.raises(ValueError, match="shrink"):
        CNN(CNNConfig(in_channels=1, image_size=2, num_classes=2, conv_channels=(4, 4)))


def test_fit_single_process_learns():
    torch.manual_seed(0)
    model = CNN(CNNConfig(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16, dropout=0.0))
    lines = []
    history = fit(model, _blobs(512, 1), _blobs(128, 2), FitConfig(epochs=3, batch_size=32, lr=0.01), log=lines.append)
    assert len(history) == 3 and len(lines) == 3 and "samples/s" in lines[0]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.9


def test_fit_rejects_a_shard_smaller_than_a_batch():
    model = CNN(CNNConfig(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(model, _blobs(8, 1), _blobs(8, 2), FitConfig(epochs=1, batch_size=32, lr=0.01))


@pytest.mark.parametrize("row_group_size", [7, 1000])  # many row groups, or fewer than workers
def test_shards_are_disjoint_and_complete(tmp_path, row_group_size):
    files = []
    for f in range(2):
        labels = np.arange(f * 50, f * 50 + 50)
        pixels = [np.full(4, v, dtype=np.float32) for v in labels]
        table = pa.table({"label": pa.array(labels, pa.int32()), "pixels": pa.array(pixels, pa.list_(pa.float32()))})
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        files.append(f"file://{path}")
    shards = [load_shard(files, (1, 2, 2), rank, 3) for rank in range(3)]
    labels = np.concatenate([y for _, y in shards])
    assert sorted(labels.tolist()) == list(range(100))
    for x, y in shards:
        assert x.flags["C_CONTIGUOUS"] and np.array_equal(x[:, 0, 0, 0], y.astype(np.float32))


def test_cosine_schedule_anneals_to_zero():
    model = CNN(CNNConfig(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16))
    seen = []
    history = fit(model, _blobs(64, 1), _blobs(32, 2), FitConfig(epochs=2, batch_size=32, lr=0.01, lr_schedule="cosine"),
                  on_epoch=lambda m: seen.append(m), log=lambda line: None)
    assert len(history) == 2 and len(seen) == 2
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9) and history[0]["lr"] == pytest.approx(0.005)
