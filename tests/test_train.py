import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dl.models import CNNConfig, ConvBlock, Net, build
from dl.train import SingleProcess, TrainConfig, fit
from dlpipe.launchers import load_shard


def _blobs(n, seed):
    """Two classes a CNN can tell apart: a bright square top-left vs bottom-right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.2, (n, 1, 12, 12)).astype(np.float32)
    for i, label in enumerate(y):
        r = slice(0, 5) if label == 0 else slice(7, 12)
        x[i, 0, r, r] += 0.8
    return x, y


def tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=128, dropout=0.25,
             batch_norm=True) -> Net:
    """A small CNN for `image_size` images (the walking skeleton's CNN shape)."""
    params = CNNConfig(blocks=[ConvBlock(channels=c, batch_norm=batch_norm) for c in conv_channels], hidden=[hidden],
                       dropout=dropout)
    return Net(name="cnn", params=params, input_shape=(in_channels, image_size, image_size), num_outputs=num_classes,
               task="classification")


def test_cnn_shapes_and_bad_size():
    model = build(tiny_net(in_channels=3, image_size=20, num_classes=7, conv_channels=(4, 8)))
    assert model(torch.zeros(5, 3, 20, 20)).shape == (5, 7)
    with pytest.raises(ValueError, match="shrink"):
        build(tiny_net(in_channels=1, image_size=2, num_classes=2, conv_channels=(4, 4)))


def test_fit_single_process_learns():
    torch.manual_seed(0)
    model = build(tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16, dropout=0.0))
    lines = []
    history = fit(model, _blobs(512, 1), _blobs(128, 2), TrainConfig(epochs=3, batch_size=32, lr=0.01), log=lines.append)
    assert len(history) == 3 and len(lines) == 3 and "samples/s" in lines[0]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.9


def test_fit_rejects_a_shard_smaller_than_a_batch():
    model = build(tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(model, _blobs(8, 1), _blobs(8, 2), TrainConfig(epochs=1, batch_size=32, lr=0.01))


@pytest.mark.parametrize("row_group_size", [2, 7, 1000])  # row groups dealt out (50 of them), or rows strided
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


def test_few_row_groups_written_class_by_class_give_every_worker_every_class(tmp_path):
    # a prepare of class folders can write one class per row group: dealing 3 of them to 2 workers
    # gave one worker no rows of some classes at all
    files = []
    for c in range(3):
        table = pa.table({"label": pa.array([c] * 40, pa.int32()),
                          "pixels": pa.array([np.full(4, c, dtype=np.float32)] * 40, pa.list_(pa.float32()))})
        pq.write_table(table, tmp_path / f"class-{c}.parquet")
        files.append(str(tmp_path / f"class-{c}.parquet"))
    for rank in range(2):
        _, y = load_shard(files, (1, 2, 2), rank, 2)
        assert np.bincount(y, minlength=3).tolist() == [20, 20, 20], rank


def test_cosine_schedule_anneals_to_zero():
    model = build(tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16))
    seen = []
    history = fit(model, _blobs(64, 1), _blobs(32, 2), TrainConfig(epochs=2, batch_size=32, lr=0.01, lr_schedule="cosine"),
                  on_epoch=lambda m: seen.append(m), log=lambda line: None)
    assert len(history) == 2 and len(seen) == 2
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9) and history[0]["lr"] == pytest.approx(0.005)


def test_linear_lr_scaling_warms_up_then_follows_the_schedule():
    from dl.train import _lr_factor

    factor = _lr_factor(TrainConfig(epochs=4, batch_size=8, lr=0.1, lr_scaling="linear", warmup_epochs=1,
                                  lr_schedule="cosine"), steps_per_epoch=10, world_size=4)
    assert factor(0) == 1.0 and factor(5) == pytest.approx(2.5)  # halfway from 1x to 4x
    assert factor(10) == pytest.approx(4.0)  # warm-up done: lr x world size
    assert factor(40) == pytest.approx(0.0, abs=1e-9)  # cosine to zero at the end
    constant = _lr_factor(TrainConfig(epochs=2, batch_size=8, lr=0.1, lr_schedule="constant"), steps_per_epoch=10,
                          world_size=4)
    assert constant(0) == constant(19) == 1.0  # lr_scaling none: the world size does not matter


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(precision):
    model = build(tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16, dropout=0.0))
    history = fit(model, _blobs(512, 1), _blobs(128, 2), TrainConfig(epochs=3, batch_size=32, lr=0.01, precision=precision),
                  log=lambda line: None)
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["val_accuracy"] > 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_checkpoint_resume_replays_the_uninterrupted_run(tmp_path):
    from dlpipe import checkpoints

    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.01, checkpoint_every=1, seed=7)
    data = (_blobs(256, 1), _blobs(64, 2))

    def model():
        torch.manual_seed(0)
        return build(tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16))

    full = model()
    fit(full, *data, cfg, log=lambda line: None)
    saved = []
    interrupted = model()
    fit(interrupted, *data, cfg, log=lambda line: None,
        save_checkpoint=lambda state: saved.append(checkpoints.save(str(tmp_path / "run"), state)))
    assert [p.rsplit("/", 1)[1] for p in saved] == [f"epoch-000{i}.pt" for i in range(1, 5)]
    state = checkpoints.load(saved[1])  # as if killed after epoch 2; weights_only=True load
    resumed = model()
    history = fit(resumed, *data, cfg, resume=state, log=lambda line: None)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # bit for bit, as docs/training.md says: every weight, statistic and counter equal, not merely close
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert checkpoints.latest(str(tmp_path / "run")).endswith("epoch-0004.pt")


def test_find_resumable_skips_finished_runs(tmp_path):
    from dlpipe import checkpoints

    for run in ("done", "crashed"):
        checkpoints.save(checkpoints.run_dir(str(tmp_path), "nightly", run), {"epoch": 1})
    found = checkpoints.find_resumable(str(tmp_path), "nightly", finished=lambda run_id: run_id == "done")
    assert found == ("crashed", f"{tmp_path}/nightly/crashed/epoch-0001.pt")
    assert checkpoints.find_resumable(str(tmp_path), "nightly", finished=lambda run_id: True) is None
    assert checkpoints.find_resumable(str(tmp_path), "other", finished=lambda run_id: False) is None
    # the newest: started, no checkpoint yet; resumed from the start only while still marked running (a killed driver)
    checkpoints.start(checkpoints.run_dir(str(tmp_path), "nightly", "killed-in-epoch-1"))
    done = lambda run_id: run_id == "done"  # noqa: E731
    assert checkpoints.find_resumable(str(tmp_path), "nightly", done, running=lambda run_id: True) == ("killed-in-epoch-1", "")
    assert checkpoints.find_resumable(str(tmp_path), "nightly", done, running=lambda run_id: False) == found


def test_gpu_requested_without_cuda_is_a_clear_error():
    from dlpipe.worker import pick_device

    assert pick_device("auto", 3).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device(False, 0).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="train.use_gpu=true but this worker sees no CUDA device"):
            pick_device(True, 0)


def test_the_validation_confusion_matrix_counts_every_val_row_as_the_net_predicts_it(tmp_path):
    import deltalake

    from dlpipe import lake
    from dlpipe.stages.train import _confusion

    x, _ = _blobs(2500, 3)  # more rows than one streamed batch
    y = np.random.default_rng(0).integers(0, 3, len(x))
    uri = str(tmp_path / "val")
    for part in (slice(0, 1200), slice(1200, None)):  # two files
        deltalake.write_deltalake(uri, pa.table({"label": pa.array(y[part], pa.int32()), "pixels": pa.array(
            list(x[part].reshape(len(y[part]), -1)), pa.list_(pa.float32()))}), mode="append")
    torch.manual_seed(0)
    net = build(tiny_net(num_classes=3))
    with torch.no_grad():
        predicted = net.eval()(torch.from_numpy(x)).argmax(1).numpy()
    matrix = _confusion(net.train(), lake.dataset(uri, 1), "pixels", (1, 12, 12), (), 3)
    expected = np.zeros((3, 3), np.int64)
    np.add.at(expected, (y, predicted), 1)
    assert (matrix == expected).all() and matrix.sum() == 2500
    two = build(tiny_net(num_classes=2)).eval()  # trained on data.select_classes: [2, 0], relabelled 0, 1
    chosen = _confusion(two, lake.dataset(uri, 1), "pixels", (1, 12, 12), (2, 0), 2)
    keep = np.isin(y, (2, 0))
    with torch.no_grad():
        predicted = two(torch.from_numpy(x[keep])).argmax(1).numpy()
    expected = np.zeros((2, 2), np.int64)
    np.add.at(expected, (np.where(y[keep] == 2, 0, 1), predicted), 1)
    assert (chosen == expected).all() and chosen.sum(1).tolist() == [(y == 2).sum(), (y == 0).sum()]


def test_overlap_starts_each_gradients_average_during_backward_and_leaves_no_hook():
    class Recording(SingleProcess):
        """2 workers as seen by one: averages are identities; records what started when."""

        rank, size = 0, 2

        def __init__(self):
            self.started, self.finished = [], 0

        def start_average_(self, tensor, key):
            self.started.append(key)
            return key

        def finish_(self, handle):
            self.finished += 1

    model = build(tiny_net(hidden=16, dropout=0.0))
    dist = Recording()
    cfg = TrainConfig(epochs=1, batch_size=32, overlap=True)
    fit(model, _blobs(64, 1), _blobs(32, 2), cfg, dist, log=lambda line: None)
    params = len(list(model.parameters()))
    assert len(dist.started) == dist.finished == 2 * params  # 2 steps, every parameter once per step
    assert dist.started[0] == f"grad.{params - 1}"  # the head's gradient first: backward runs from the top
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
