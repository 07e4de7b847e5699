"""Data-parallel training on real worker processes: Horovod and TorchDistributor on the local
Spark, both sync modes, failures and resume."""

import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from dl.train import TrainConfig
from dlpipe import lake, modeling
from dlpipe.launchers import TrainTask, WorkerError, launch
from tests.conftest import mlflow_store
from tests.test_train import _blobs, tiny_net

pytestmark = pytest.mark.slow
BACKENDS = ["horovod", "torch_distributor"]


def _files(tmp_path, name, x, y, row_groups=1):
    table = pa.table({"label": pa.array(y, pa.int32()), "pixels": pa.array(list(x.reshape(len(y), -1)), pa.list_(pa.float32()))})
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path, row_group_size=-(-len(y) // row_groups))
    return [str(path)]


def _task(tmp_path, fit: TrainConfig, train_files=None, **model):
    x, y = _blobs(600, 1)
    vx, vy = _blobs(100, 2)
    return TrainTask(net=tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16, dropout=0.0,
                        batch_norm=False) if not model else tiny_net(**model),
        train=fit, train_files=train_files or _files(tmp_path, "train", x, y), val_files=_files(tmp_path, "val", vx, vy),
        tracking_uri=mlflow_store(tmp_path), threads=1,
    )


# what psutil raises when a process exits (or is reaped) while we look at it
PROCESS_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


def _children(pid: int) -> list[psutil.Process]:
    """The live descendants of `pid`; [] once it has exited."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except PROCESS_GONE:
        return []


def _cmdline(process: psutil.Process) -> str:
    """The command line of a process that may exit at any moment ("" once it has)."""
    try:
        return " ".join(process.cmdline())
    except PROCESS_GONE:
        return ""


def _close(a: dict, b: dict, atol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a)


@pytest.mark.parametrize("backend, overlap", [("horovod", False), ("horovod", True), ("torch_distributor", False)])
def test_two_workers_match_one_worker_with_the_global_batch(spark, tmp_path, backend, overlap):
    """Gradient allreduce: 2 workers x batch 16 == 1 worker x batch 32 (no shuffle, plain SGD), with
    the gradients averaged after backward or, overlap, each as backward produces it."""
    sgd = dict(epochs=2, lr=0.1, optimizer="sgd", shuffle=False, sync="allreduce")
    single = launch(spark, _task(tmp_path, TrainConfig(batch_size=32, **sgd)), "local", 1)
    double = launch(spark, _task(tmp_path, TrainConfig(batch_size=16, overlap=overlap, **sgd)), backend, 2)
    assert double["world_size"] == 2 and double["backend"] == backend
    assert _close(single["state_dict"], double["state_dict"])
    assert double["history"][-1]["loss"] < double["history"][0]["loss"]
    assert len(double["worker_samples_per_sec"]) == 2 and min(double["worker_samples_per_sec"]) > 0


def test_allreduce_reports_the_validation_of_the_saved_model(spark, tmp_path):
    """Batch-norm statistics are synchronized, so the val figures (summed over the ranks' val
    shards) are those of the model rank 0 returns, on the whole val table (issue 12, defect 2)."""
    from dl.models import build
    from dl.train import _evaluate, _loss
    from dlpipe.launchers import load_shard

    task = _task(tmp_path, TrainConfig(epochs=2, batch_size=16, lr=0.01, sync="allreduce", seed=3),
                 in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16, dropout=0.0, batch_norm=True)
    result = launch(spark, task, "horovod", 2)
    assert result["backend"] == "horovod" and result["world_size"] == 2
    model = build(task.net)
    model.load_state_dict(result["state_dict"])
    val = load_shard(task.val_files, tuple(task.net.input_shape), 0, 1)
    loss, correct, n = _evaluate(model, val, 64, _loss("classification"), torch.device("cpu"))
    last = result["history"][-1]
    assert last["val_loss"] == pytest.approx(loss / n, rel=1e-5)
    assert last["val_accuracy"] == pytest.approx(correct / n)


def test_parameter_averaging_every_step_equals_allreduce_for_sgd(spark, tmp_path):
    base = dict(epochs=2, batch_size=16, lr=0.1, optimizer="sgd", shuffle=True, seed=5)
    allreduce = launch(spark, _task(tmp_path, TrainConfig(sync="allreduce", **base)), "horovod", 2)
    averaged = launch(spark, _task(tmp_path, TrainConfig(sync="average", average_every=1, **base)), "horovod", 2)
    for result in (allreduce, averaged):  # two real Horovod workers, not a fallback to one process
        assert (result["backend"], result["world_size"]) == ("horovod", 2)
    assert _close(allreduce["state_dict"], averaged["state_dict"])


BN_NET = dict(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16, dropout=0.0, batch_norm=True)


def test_averaging_batch_norm_and_adam_is_the_hand_computed_average(spark, tmp_path):
    """Parameter averaging with batch norm and Adam: after one epoch of local steps the model
    (weights and batch-norm statistics) and Adam's moments are the mean of what each worker
    reached alone on its shard; and averaging every step is not the same as gradient allreduce
    (Adam's update and the statistics are not linear in the gradients)."""
    import dataclasses

    from dl.models import build
    from dl.train import SingleProcess, fit
    from dlpipe import checkpoints
    from dlpipe.launchers import load_shard

    once = TrainConfig(epochs=1, batch_size=16, lr=0.01, optimizer="adam", shuffle=False, sync="average",
                     average_every=10_000, checkpoint_every=1, seed=3)
    task = dataclasses.replace(_task(tmp_path, once, **BN_NET), checkpoint_dir=str(tmp_path / "ckpt"))
    averaged = launch(spark, task, "horovod", 2)
    assert (averaged["backend"], averaged["world_size"]) == ("horovod", 2)
    alone, threads = [], torch.get_num_threads()
    torch.set_num_threads(task.threads)  # as the workers: other thread counts round differently, and Adam
    # turns the rounding noise of a gradient that batch norm cancels (a conv bias) into full-size steps
    for rank in (0, 1):  # each worker's epoch, by hand, in this process
        shape = tuple(task.net.input_shape)
        torch.manual_seed(once.seed)
        model, saved = build(task.net), []
        fit(model, load_shard(task.train_files, shape, rank, 2), load_shard(task.val_files, shape, rank, 2), once,
            SingleProcess(), save_checkpoint=saved.append, log=lambda line: None)
        alone.append(saved[-1])
    torch.set_num_threads(threads)
    for key, value in averaged["state_dict"].items():
        a, b = alone[0]["model"][key], alone[1]["model"][key]
        if value.is_floating_point():
            assert torch.allclose(value, (a + b) / 2, atol=1e-6), key
        else:
            assert torch.equal(value, a) and torch.equal(a, b), key  # batch-norm step counts
    assert any("running_var" in key for key in averaged["state_dict"])
    moments = checkpoints.load(checkpoints.latest(task.checkpoint_dir))["optimizer"]["state"]
    assert moments
    for param, state in moments.items():
        for key in ("exp_avg", "exp_avg_sq"):
            mean = (alone[0]["optimizer"]["state"][param][key] + alone[1]["optimizer"]["state"][param][key]) / 2
            assert torch.allclose(state[key], mean, atol=1e-7), (param, key)

    every_step = dict(epochs=2, batch_size=16, lr=0.01, optimizer="adam", shuffle=True, seed=5)
    allreduce = launch(spark, _task(tmp_path, TrainConfig(sync="allreduce", **every_step), **BN_NET), "horovod", 2)
    average_1 = launch(spark, _task(tmp_path, TrainConfig(sync="average", average_every=1, **every_step), **BN_NET),
                       "horovod", 2)
    assert not _close(allreduce["state_dict"], average_1["state_dict"], atol=1e-4)


def test_parameter_averaging_every_8_steps_converges_on_real_images(spark, prepared_small):
    cfg, prepared = prepared_small
    tables = prepared["tables"]
    task = TrainTask(net=modeling.image_net(cfg.model, cfg.data),
        train=TrainConfig(epochs=6, batch_size=8, lr=0.003, lr_schedule="constant", sync="average", average_every=8,
                          seed=1),
        train_files=lake.table_files(tables["train"]["uri"], tables["train"]["version"]),
        val_files=lake.table_files(tables["val"]["uri"], tables["val"]["version"]),
        tracking_uri=cfg.mlflow.tracking_uri, threads=1,
    )
    result = launch(spark, task, "horovod", 2)
    assert (result["backend"], result["world_size"]) == ("horovod", 2)
    history = result["history"]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.4  # 10 classes: chance is 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_uneven_shards_finish_and_a_failing_worker_is_named(spark, tmp_path, backend):
    # 601 rows in 3 row groups over 2 workers: rank 0 strides over 301, rank 1 over 300; everyone takes the same steps
    x, y = _blobs(601, 3)
    uneven = _task(tmp_path, TrainConfig(epochs=1, batch_size=16, lr=0.05), train_files=_files(tmp_path, "uneven", x, y, 3))
    assert launch(spark, uneven, backend, 2)["train_rows"] == 601
    # row 63, rank 1's, holds 3 values per image instead of 144: rank 1 fails while loading its shard
    good = _files(tmp_path, "good", *_blobs(63, 4))
    bad = pa.table({"label": pa.array([1], pa.int32()), "pixels": pa.array([[0.0] * 3], pa.list_(pa.float32()))})
    pq.write_table(bad, tmp_path / "bad.parquet")
    broken = _task(tmp_path, TrainConfig(epochs=1, batch_size=16, lr=0.05), train_files=good + [str(tmp_path / "bad.parquet")])
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1: ValueError: .*bad.parquet row group 0: pixels hold 3 values for 1 rows"):
        launch(spark, broken, backend, 2)
    assert time.monotonic() - started < 180  # reported, not hung until some timeout


def test_killed_worker_then_resume_continues_the_run(prepared_small, tmp_path):
    cfg, _ = prepared_small
    epochs = 12  # the kill comes after epoch 2; the rest leaves it time to land before the run ends
    args = [sys.executable, "-m", "dlpipe.cli", "train", "--set", f"paths.lake={cfg.paths.lake}",
            "--set", f"data.name={cfg.data.name}", "--set", f"data.classes=[{','.join(cfg.data.classes)}]",
            "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", "--set", f"mlflow.artifact_root={cfg.mlflow.artifact_root}",
            "--set", f"train.checkpoint_uri={tmp_path}/ckpt", "--set", "train.run_name=resume_test",
            "--set", f"train.epochs={epochs}", "--set", "train.batch_size=16", "--set", "model.cnn.blocks=[{channels: 4}]",
            "--set", "model.cnn.hidden=[16]", "--set", "spark.master=local[2]", "--set", "spark.conf.spark.ui.enabled=false",
            "--summary", str(tmp_path / "train.json")]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    killed = None
    while first.poll() is None and time.monotonic() < deadline and killed is None:
        if list((tmp_path / "ckpt" / "resume_test").glob("*/epoch-0002.pt")):
            workers = [p for p in _children(first.pid) if "gloo_exec_fn" in _cmdline(p)]
            if workers:
                try:
                    workers[-1].send_signal(signal.SIGKILL)
                    killed = workers[-1]
                except PROCESS_GONE:  # it exited between the listing and the signal: take the next one
                    pass
        time.sleep(0.2)
    output = first.communicate(timeout=300)[0]
    assert killed is not None, output[-3000:]
    assert first.returncode != 0, "the job must fail when a worker dies"
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming MLflow run" in second.stdout
    import json

    summary = json.loads((tmp_path / "train.json").read_text())
    resumed_epoch = int(summary["resumed_from"].rsplit("epoch-", 1)[1].split(".")[0])
    assert 2 <= resumed_epoch < epochs
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(summary["run_id"], "loss")
    steps_logged = [m.step for m in history]
    assert len(steps_logged) == len(set(steps_logged)), "an epoch was logged twice: epochs were repeated"
    assert max(steps_logged) == epochs and summary["metrics"]["epochs"] == epochs
    assert "resume_test" in summary["resumed_from"] and summary["run_id"] in summary["resumed_from"]


def test_process_helpers_tolerate_a_process_that_just_exited():
    """The race of issue 12: a child exits (a zombie, not yet reaped) while its command line is read."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(PROCESS_GONE):
        psutil.Process(child.pid).cmdline()  # what the old inline `p.cmdline()` ran into
    assert _cmdline(psutil.Process(child.pid)) == ""
    assert _children(child.pid) == []
    child.wait()
    assert _children(child.pid) == []  # reaped: no such process at all
