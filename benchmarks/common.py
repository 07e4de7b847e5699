"""What every benchmark shares: the pinned tables it reads, their rows as arrays, one dlpipe
training run through a launcher, and a line of progress."""

from __future__ import annotations

import time

import numpy as np

from dl.train import METRICS
from dlpipe import lake
from dlpipe.config import Config
from dlpipe.errors import InputNotFound
from dlpipe.launchers import TrainTask, launch, load_shard


def say(line: str) -> None:
    print(f"bench: {line}", flush=True)


def latest_tables(cfg: Config, splits=("train", "test"), hint: str = "run `dlpipe prepare` first") -> dict[str, tuple[str, int]]:
    """{split: (uri, latest version)}, resolved once at the start of a benchmark."""
    tables = {}
    for split in splits:
        uri = cfg.table_uri(split)
        version = lake.latest_version(uri)
        if version is None:
            raise InputNotFound(f"no Delta table at {uri}: {hint}")
        tables[split] = (uri, version)
    return tables


def arrays(files: list[str], shape: tuple[int, ...], labels: tuple[int, ...] = (), fraction: float = 1.0):
    """All rows of a snapshot as (x, y) arrays (dlpipe's reader, off every timed path)."""
    return load_shard(files, shape, 0, 1, labels=labels, fraction=fraction)


def dlpipe_run(spark, task: TrainTask, backend: str, workers: int) -> dict:
    """dlpipe's loop through a launcher; the task's "val" files are the test table here, so val_*
    are test figures. Start-up is the wall time not spent in epochs."""
    started = time.perf_counter()
    result = launch(spark, task, backend, workers)
    wall = time.perf_counter() - started
    history = result["history"]
    metric = next(f"val_{m}" for m in METRICS.values() if f"val_{m}" in history[-1])  # the task's epoch figure
    return {"test_accuracy": history[-1][metric], "samples_per_sec": float(np.mean([h["samples_per_sec"] for h in history])),
            "train_wall_s": wall, "startup_s": wall - sum(h["epoch_seconds"] for h in history), "epochs": len(history),
            "backend": result["backend"], "world_size": result["world_size"], "train_rows": result["train_rows"],
            "history": history, "state_dict": result["state_dict"]}
