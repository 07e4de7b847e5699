"""Launchers for the one training loop in dl.train: in-process, or Horovod on the job's Spark
executors. Only the launcher differs; the loop, the model and the data path do not."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dl.models import CNN, CNNConfig
from dl.train import FitConfig, SingleProcess, fit


@dataclass(frozen=True, kw_only=True)
class TrainTask:
    """Everything a worker needs, small enough to ship to executors (file URIs, not data)."""

    model: CNNConfig
    fit: FitConfig
    train_files: list[str]
    val_files: list[str]
    max_rows: int  # per split, 0 = all
    tracking_uri: str
    run_id: str
    threads: int


class HorovodDist:
    def __init__(self, hvd):
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()

    def sum(self, values):
        return self.hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=self.hvd.Sum).tolist()

    def min(self, value):
        return int(self.hvd.allreduce(torch.tensor([value]), op=self.hvd.Min).item())

    def prepare(self, model, optimizer):
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())


def load_shard(files: list[str], shape: tuple[int, int, int], rank: int, size: int, max_rows: int = 0):
    """This worker's rows of a pinned Delta snapshot, read with pyarrow into contiguous arrays.

    Row groups are dealt out round-robin by rank; with fewer row groups than workers every
    worker strides over the rows instead. The driver never touches the data."""
    pieces = [(f, g) for f in files for g in range(pq.ParquetFile(_local(f)).num_row_groups)]
    tables = []
    if len(pieces) >= size:
        for i, (f, g) in enumerate(pieces):
            if i % size == rank:
                tables.append(pq.ParquetFile(_local(f)).read_row_group(g, columns=["label", "pixels"]))
    else:
        for f in files:
            table = pq.read_table(_local(f), columns=["label", "pixels"])
            tables.append(table.take(np.arange(rank, table.num_rows, size)))
    rows = sum(t.num_rows for t in tables)
    x = np.empty((rows, *shape), dtype=np.float32)
    y = np.empty(rows, dtype=np.int64)
    at = 0
    for t in tables:
        n = t.num_rows
        x[at : at + n] = pc.list_flatten(t.column("pixels")).to_numpy().reshape(n, *shape)
        y[at : at + n] = t.column("label").to_numpy()
        at += n
    if max_rows:
        keep = max(max_rows // size, 1)
        x, y = x[:keep], y[:keep]
    return x, y


def _local(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def train_worker(task: TrainTask, use_horovod: bool):
    """Runs on every worker (a Spark task under Horovod). Rank 0 returns the weights."""
    torch.set_num_threads(task.threads)
    if use_horovod:
        import horovod.torch as hvd

        hvd.init()
        dist = HorovodDist(hvd)
    else:
        dist = SingleProcess()
    shape = (task.model.in_channels, task.model.image_size, task.model.image_size)
    train = load_shard(task.train_files, shape, dist.rank, dist.size, task.max_rows)
    val = load_shard(task.val_files, shape, dist.rank, dist.size, task.max_rows)
    model = CNN(task.model)
    on_epoch = _mlflow_logger(task) if dist.rank == 0 else None
    history = fit(model, train, val, task.fit, dist, on_epoch=on_epoch, log=lambda line: print(line, flush=True))
    rows = dist.sum([len(train[0])])[0]  # a collective: every rank takes part
    if dist.rank != 0:
        return None
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "history": history,
            "train_rows": int(rows), "world_size": dist.size}


def _mlflow_logger(task: TrainTask):
    def log(metrics: dict) -> None:
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        step = metrics["epoch"]
        MlflowClient(task.tracking_uri).log_batch(
            task.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
        )

    return log


def launch(spark, task: TrainTask, backend: str, num_workers: int) -> dict:
    """Run train_worker on `num_workers` Horovod workers (Spark tasks), or in this process."""
    if backend == "horovod":
        try:
            import horovod.spark
            import horovod.torch  # noqa: F401
        except ImportError as exc:
            print(f"dlpipe: Horovod is not importable ({exc}); training in ONE local process instead of "
                  f"{num_workers} Horovod workers", file=sys.stderr, flush=True)
            backend = "local"
    if backend == "local":
        return train_worker(task, use_horovod=False)
    slots = spark.sparkContext.defaultParallelism
    if num_workers > slots:
        raise RuntimeError(f"train.num_workers={num_workers} needs {num_workers} concurrent Spark task slots; "
                           f"this Spark application has {slots}")
    results = horovod.spark.run(train_worker, args=(task, True), num_proc=num_workers, use_gloo=True,
                                 use_mpi=False, verbose=1, env=dict(os.environ))
    return next(r for r in results if r is not None)
