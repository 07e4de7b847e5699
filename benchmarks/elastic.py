"""`dlpipe bench elastic`: what losing one of 2 Horovod workers costs. The CNN trains twice on the
prepared tables with `train.elastic` (the same net, batch, constant lr and threads): once
uninterrupted, once with worker rank 1 killed (SIGKILL of its process) half an epoch after the first
epoch's checkpoint. The survivor goes on alone from the last commit; Spark runs the lost task again
and Horovod takes it back at a later commit. Reports the time lost against the uninterrupted run,
its epoch time, and the final test accuracy against it.

Needs Spark to retry a lost task: run it with `--set spark.master=local[2,4]` (local[N] gives a
task one attempt, and a lost worker would end the job)."""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import dlpipe_run, latest_tables, say
from dl.train import TrainConfig
from dlpipe import lake, modeling
from dlpipe.config import Config
from dlpipe.launchers import TrainTask

GOALS = {"accuracy_delta": ">= -0.005", "time_lost_s": "< epoch_s"}


def horovod_processes(procs) -> list[tuple[int, dict[str, str]]]:
    """(pid, environment) of the Horovod-on-Spark worker processes (the processes Spark's task
    services start) among psutil processes `procs`; one that ended meanwhile is left out."""
    import psutil

    found = []
    for proc in procs:
        try:
            if "horovod.spark.task.gloo_exec_fn" in " ".join(proc.cmdline()):
                found.append((proc.pid, proc.environ()))
        except psutil.Error:  # ended meanwhile
            continue
    return found


def horovod_workers(under: int | None = None) -> dict[int, int]:
    """{rank at start: pid} of the Horovod-on-Spark worker processes (each keeps the HOROVOD_RANK it
    was started with) that descend from process `under` (default: this one), so another job's
    workers on the same machine are never touched."""
    import psutil

    children = psutil.Process(under or os.getpid()).children(recursive=True)
    return {int(env["HOROVOD_RANK"]): pid for pid, env in horovod_processes(children) if "HOROVOD_RANK" in env}


def kill_worker(rank: int, timeout_s: float = 60.0, under: int | None = None) -> int:
    """SIGKILL the worker process started as `rank` below process `under` (default: this one); its pid."""
    deadline = time.monotonic() + timeout_s
    while (pid := horovod_workers(under).get(rank)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Horovod worker of rank {rank} appeared in {timeout_s:.0f} s")
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return pid


def _kill_after_first_checkpoint(checkpoints: Path, delay_s: float, killed: list) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 600
        while not any(checkpoints.rglob("epoch-0001.pt")) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay_s)
        killed.append(kill_worker(1))
        say(f"killed worker rank 1 (pid {killed[-1]}) {delay_s:.1f} s after the first epoch's checkpoint")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run(spark, cfg: Config) -> dict:
    net = modeling.image_net(cfg.model, cfg.data)
    tables = latest_tables(cfg)
    t = cfg.train
    fit = TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed, lr_schedule="constant",
                      num_workers=2, elastic=True, min_workers=1, commit_every=t.commit_every, checkpoint_every=1)
    with tempfile.TemporaryDirectory(prefix="dlpipe-bench-elastic-") as scratch:
        task = TrainTask(net=net, train=fit, train_files=lake.table_files(*tables["train"]),
                         val_files=lake.table_files(*tables["test"]), threads=1,  # "val" = the test set
                         checkpoint_dir=f"{scratch}/whole")
        say("uninterrupted: 2 elastic Horovod workers")
        whole = dlpipe_run(spark, task, "horovod", 2)
        epoch_s = sum(h["epoch_seconds"] for h in whole["history"]) / len(whole["history"])
        killed: list[int] = []
        watcher = _kill_after_first_checkpoint(Path(scratch) / "lossy", epoch_s / 2, killed)
        say("interrupted: worker rank 1 killed half an epoch after the first checkpoint")
        lossy = dlpipe_run(spark, dataclasses.replace(task, checkpoint_dir=f"{scratch}/lossy"), "horovod", 2)
        watcher.join(timeout=5)
    if not killed:
        raise RuntimeError("the interrupted run ended before its worker was killed: train more epochs (--set train.epochs=...)")
    summary = {
        "step": "bench elastic", "epochs": t.epochs, "batch_size_per_worker": t.batch_size, "commit_every": t.commit_every,
        "tables": {s: {"uri": u, "version": v} for s, (u, v) in tables.items()},
        "uninterrupted": {k: whole[k] for k in ("train_wall_s", "test_accuracy", "samples_per_sec", "world_size")},
        "interrupted": {k: lossy[k] for k in ("train_wall_s", "test_accuracy", "samples_per_sec", "world_size")}
        | {"epoch_samples": [h["samples"] for h in lossy["history"]], "train_rows": lossy["train_rows"]},
        "time_lost_s": lossy["train_wall_s"] - whole["train_wall_s"], "epoch_s": epoch_s,
        "accuracy_delta": lossy["test_accuracy"] - whole["test_accuracy"], "goals": GOALS,
    }
    say(f"time lost {summary['time_lost_s']:.1f} s against an epoch of {epoch_s:.1f} s; test accuracy "
        f"{lossy['test_accuracy']:.4f} against {whole['test_accuracy']:.4f} ({summary['accuracy_delta']:+.4f}); "
        f"ended with {lossy['world_size']} workers")
    return summary
