"""Elastic training (train.elastic, Horovod). Fast: the loop deals every row of an epoch out once
across a change of world size, a commit inside an epoch resumes bit for bit, the config and the
master are checked. Slow: real `dlpipe train` processes on Spark local[2,F] whose Horovod worker
rank 1 is killed (SIGKILL of its process): dropped and taken back, or, below train.min_workers and
out of Spark attempts, a one-line failure (never a hang) that the next train resumes."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyspark
import pytest
import torch
from torch import nn

from benchmarks.elastic import horovod_processes, horovod_workers, kill_worker
from dl.models import build
from dl.train import SingleProcess, TrainConfig, fit
from dlpipe.config import load_config
from dlpipe.errors import ConfigError
from dlpipe.launchers import task_attempts
from tests.conftest import read_table
from tests.test_drills import cli_args
from tests.test_train import _blobs, tiny_net


class Alone(SingleProcess):
    """Rank `rank` of `size`, with no peers here: each collective sees this rank's values only."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


class Recorder(nn.Module):
    """Its objective records which rows (feature 0 holds the row's number) it was trained on."""

    def __init__(self):
        super().__init__()
        self.w, self.rows = nn.Linear(1, 1), []

    def objective(self, x, y):
        if self.training:  # not validation
            self.rows += x[:, 0].long().tolist()
        return (self.w(x) * 0).sum(), 0.0


class Stop(Exception):
    pass


def test_an_epoch_trains_every_row_once_across_a_change_of_world_size():
    """2 workers to the first commit (3 steps of 2 x 4 rows), then 1 from that commit on: every row
    of the epoch is trained once, but for a tail shorter than one global batch."""
    cfg = TrainConfig(epochs=1, batch_size=4, num_workers=2, commit_every=3, lr=0.01)
    rows = 50
    data = (np.arange(rows, dtype=np.float32).reshape(rows, 1), np.zeros(rows, np.int64))
    snapshots, trained = [], []

    def first_commit(snapshot):
        snapshots.append(snapshot)
        raise Stop  # as Horovod does when the world changes: back to hvd.elastic.run

    for rank in (0, 1):
        model = Recorder()
        with pytest.raises(Stop):
            fit(model, data, data, cfg, Alone(rank, 2), commit=first_commit, log=lambda line: None)
        trained += model.rows
    assert snapshots[0]["within"]["position"] == 24 and snapshots[0]["epoch"] == 0
    model = Recorder()
    history = fit(model, data, data, cfg, Alone(0, 1), resume=snapshots[0], commit=lambda s: None, log=lambda line: None)
    trained += model.rows
    assert len(trained) == len(set(trained)) == 48  # 3 x 8, then 6 x 4: none twice
    assert len(history) == 1 and history[0]["epoch"] == 1


def test_a_commit_inside_an_epoch_resumes_bit_for_bit():
    cfg = TrainConfig(epochs=3, batch_size=16, num_workers=1, commit_every=4, lr=0.01, seed=3)
    data = (_blobs(256, 1), _blobs(64, 2))

    def model():
        torch.manual_seed(0)
        return build(tiny_net(hidden=16, dropout=0.0))

    snapshots = []
    full = model()
    whole = fit(full, *data, cfg, commit=snapshots.append, log=lambda line: None)
    mid = next(s for s in snapshots if s["epoch"] == 1 and s["within"])  # inside epoch 2
    resumed = model()
    history = fit(resumed, *data, cfg, resume=mid, commit=lambda s: None, log=lambda line: None)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == [h["loss"] for h in whole]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert all(h["samples"] == 256 for h in whole)


@pytest.mark.parametrize("override, key", [
    (["train.backend=torch_distributor"], "train.elastic"),
    (["train.min_workers=3"], "train.min_workers"),
    (["train.max_workers=1"], "train.min_workers"),
    (["train.commit_every=0"], "train.commit_every"),
    (["model.name=som", "model.task=clustering", "data.kind=table"], "train.elastic"),
])
def test_elastic_config_is_checked_before_spark_starts(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["train.elastic=true", *override])


@pytest.mark.parametrize("master, attempts", [("local[2]", 1), ("local", 1), ("local[2,4]", 4), ("local[*,3]", 3),
                                              ("spark://host:7077", 4)])
def test_how_many_attempts_spark_gives_a_task(master, attempts):
    class Context:
        def getConf(self):
            return {}

    context = Context()
    context.master = master
    assert task_attempts(context) == attempts


def train_process(cfg, tmp_path, name, master, *sets):
    args = [*cli_args(cfg), "--set", f"spark.master={master}", "--set", "train.backend=horovod",
            "--set", "train.elastic=true", "--set", f"train.run_name={name}", "--set", "train.batch_size=4",
            "--set", "train.commit_every=5", "--set", f"train.checkpoint_uri={tmp_path / 'checkpoints'}", *sets]
    return subprocess.Popen([sys.executable, "-m", "dlpipe.cli", "train", *args, "--summary", str(tmp_path / f"{name}.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd(), "DLPIPE_TEST_RUN": str(tmp_path)})


def workers_left(tmp_path) -> list[int]:
    """Horovod worker processes of the train started by `train_process` in `tmp_path` still alive
    anywhere on the machine (an orphan is no longer below the train; the environment still tells)."""
    import psutil

    return [pid for pid, env in horovod_processes(psutil.process_iter()) if env.get("DLPIPE_TEST_RUN") == str(tmp_path)]


def read_until(child, text: str, seen: list) -> None:
    while True:
        line = child.stdout.readline()
        assert line, f"train ended ({child.wait()}) before a line with {text!r}:\n" + "".join(seen[-40:])
        seen.append(line)
        if text in line:  # Horovod forwards a worker's lines as [<rank>]<stdout>:<line>
            return


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_dropped_and_taken_back(prepared_small, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, prepared = prepared_small
    child = train_process(cfg, tmp_path, "elastic_back", "local[2,4]", "--set", "train.epochs=40",
                          "--set", "train.min_workers=1")
    seen = []
    try:
        read_until(child, "epoch 2/", seen)
        assert workers_left(tmp_path), "the workers do not carry the test's environment"
        kill_worker(1, under=child.pid)
        out, _ = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 9)
    seen.append(out)
    log = "".join(seen)
    assert child.returncode == 0, log[-3000:]
    summary = json.loads((tmp_path / "elastic_back.json").read_text())
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "workers"), key=lambda m: m.timestamp)]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes  # dropped, then taken back
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == list(range(1, 41))
    rows = len(read_table(prepared, "train"))
    samples = [m.value for m in client.get_metric_history(run.info.run_id, "samples")]
    assert all(rows - 2 * 4 < s <= rows for s in samples), (rows, samples)  # every row but a tail, never twice
    assert not workers_left(tmp_path)


def executor_of(pid: int) -> int:
    """The Spark executor JVM a process runs under (its nearest CoarseGrainedExecutorBackend ancestor)."""
    import psutil

    for parent in psutil.Process(pid).parents():
        if "CoarseGrainedExecutorBackend" in " ".join(parent.cmdline()):
            return parent.pid
    raise AssertionError(f"process {pid} runs under no Spark executor")


@pytest.mark.slow
def test_an_executor_lost_on_a_local_cluster_is_dropped_and_its_task_taken_back(prepared_small, tmp_path):
    """local-cluster: 2 executors of 1 core, one worker each. The executor JVM of worker rank 1 is
    killed (SIGKILL): its worker goes with it, the survivor goes on, and Spark runs the lost task on
    the executor the cluster starts in its place (about 10 s to a running worker), where Horovod
    takes it back; 120 short epochs leave it the time."""
    from mlflow.tracking import MlflowClient

    cfg, _ = prepared_small
    child = train_process(cfg, tmp_path, "elastic_executor", "local-cluster[2,1,1024]", "--set", "train.epochs=120",
                          "--set", "train.min_workers=1")
    seen = []
    try:  # an executor's worker prints to the executor's log, not here: its first checkpoint tells
        deadline = time.monotonic() + 300
        while not any((tmp_path / "checkpoints").rglob("epoch-0001.pt")):
            assert time.monotonic() < deadline and child.poll() is None, "no first checkpoint"
            time.sleep(0.05)
        worker = horovod_workers(child.pid)[1]
        os.kill(executor_of(worker), 9)
        out, _ = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 9)
    seen.append(out)
    assert child.returncode == 0, "".join(seen)[-3000:]
    summary = json.loads((tmp_path / "elastic_executor.json").read_text())
    # the cluster's executors copied every jar (about 2 GB) into <SPARK_HOME>/work/<app id>: not kept
    shutil.rmtree(Path(pyspark.__file__).parent / "work" / summary["spark_app_id"])
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    sizes = [int(m.value) for m in sorted(client.get_metric_history(summary["run_id"], "workers"), key=lambda m: m.timestamp)]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes  # the new executor's worker: an epoch's time
    assert sorted(m.step for m in client.get_metric_history(summary["run_id"], "val_loss")) == list(range(1, 121))


@pytest.mark.slow
def test_below_min_workers_and_out_of_attempts_fails_in_one_line_then_resumes(prepared_small, tmp_path):
    """min_workers=2 and local[2,2]: rank 1 killed, its task's second attempt killed too; Spark fails
    the job and Horovod would wait forever. The step fails in one line instead; the next train
    resumes the run from its last checkpoint and finishes it."""
    from mlflow.tracking import MlflowClient

    cfg, _ = prepared_small
    sets = ("--set", "train.epochs=40", "--set", "train.min_workers=2", "--set", "train.elastic_timeout_s=10")
    child = train_process(cfg, tmp_path, "elastic_short", "local[2,2]", *sets)
    seen = []
    try:
        read_until(child, "epoch 2/", seen)
        kill_worker(1, under=child.pid)
        read_until(child, "elastic: 2 workers, from epoch", seen)  # Spark's second attempt, taken back
        kill_worker(1, under=child.pid)
        started = time.monotonic()
        out, _ = child.communicate(timeout=300)
        waited = time.monotonic() - started
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 9)
    errors = [line for line in out.splitlines() if line.startswith("dlpipe: error:")]
    print(f"failed {waited:.0f} s after the second kill" + (" (the watchdog broke Horovod's wait)" if "BrokenBarrierError" in out else ""))
    assert child.returncode == 1 and len(errors) == 1 and "train.min_workers=2" in errors[0], out[-3000:]
    assert waited < 120  # the elastic timeout (10 s) and the watchdog's grace (30 s), not forever
    run_id = next(p.name for p in (tmp_path / "checkpoints" / "elastic_short").iterdir())

    again = train_process(cfg, tmp_path, "elastic_short", "local[2,4]", *sets)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert f"resuming MLflow run {run_id} from" in out
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(1, 41))
