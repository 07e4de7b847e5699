"""The peer of `dlpipe bench training`: Ray Train's TorchTrainer, written as its docs teach (the
model wrapped by `ray.train.torch.prepare_model`: DistributedDataParallel over Gloo, whose bucketed
allreduce overlaps the backward pass), on the same net, the same shards (dlpipe's own shard reader),
batch per worker, Adam at a constant learning rate, seed and one torch thread per worker.

Installed only for the benchmarks: `pip install "ray[train]==2.60.0"` (PEER_INSTALL); without it the
summary says the peer did not run. samples/s is counted as dlpipe counts it: every worker's training
samples of an epoch over rank 0's training seconds of that epoch, averaged over the epochs."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

PEER_INSTALL = 'pip install "ray[train]==2.60.0"'


def available() -> bool:
    try:
        import ray.train.torch  # noqa: F401
    except ImportError:
        return False
    return True


def ray_fit(net, train_files: list[str], test_files: list[str], *, epochs: int, batch_size: int, lr: float, seed: int,
            workers: int = 2, say=print) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=256 * 2**20, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})  # benchmarks, dl, dlpipe
    try:
        with tempfile.TemporaryDirectory() as storage:
            # Ray Train 2.x keeps only the metrics reported with a checkpoint: rank 0 leaves them in a file
            config = {"net": net, "train_files": train_files, "test_files": test_files, "epochs": epochs,
                      "batch_size": batch_size, "lr": lr, "seed": seed, "out": f"{storage}/metrics.json"}
            TorchTrainer(_loop, train_loop_config=config,
                         scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name="dlpipe-bench-peer", storage_path=storage)).fit()
            metrics = json.loads(Path(config["out"]).read_text())
    finally:
        ray.shutdown()
    wall = time.perf_counter() - started
    history = metrics["history"]
    say(f"ray peer: {metrics['samples_per_sec']:.0f} samples/s, test accuracy {metrics['test_accuracy']:.4f}")
    return {"samples_per_sec": metrics["samples_per_sec"], "test_accuracy": metrics["test_accuracy"], "history": history,
            "train_wall_s": wall, "startup_s": wall - sum(h["epoch_seconds"] for h in history),
            "world_size": metrics["world_size"], "ray_version": ray.__version__}


def _loop(config: dict) -> None:
    """On every Ray worker: this rank's shard, the net under DDP, the epochs; rank 0's test accuracy."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as td

    from benchmarks.plain_loop import accuracy
    from dl.models import build
    from dlpipe.worker import load_shard

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    shape, batch = tuple(config["net"].input_shape), config["batch_size"]
    x, y = load_shard(config["train_files"], shape, rank, size)
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    steps = torch.tensor([len(x) // batch])
    td.all_reduce(steps, op=td.ReduceOp.MIN)  # every worker the same number of steps, as dlpipe does
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(build(config["net"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], fused=True)  # as dlpipe's (dl.train)
    loss_fn = torch.nn.CrossEntropyLoss()
    test = load_shard(config["test_files"], shape, 0, 1) if rank == 0 else None
    history = []
    for epoch in range(1, config["epochs"] + 1):
        model.train()
        order = torch.from_numpy(np.random.default_rng([config["seed"], epoch, rank]).permutation(len(x)))
        t0 = time.perf_counter()
        for step in range(int(steps)):
            idx = order[step * batch : (step + 1) * batch]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        seen = torch.tensor([float(int(steps) * batch)], dtype=torch.float64)
        td.all_reduce(seen)  # every worker's samples
        td.broadcast(seconds, 0)  # over rank 0's seconds, as dlpipe's epoch line
        tested = accuracy(model.module if hasattr(model, "module") else model, test) if rank == 0 else 0.0
        history.append({"epoch": epoch, "samples_per_sec": float(seen / seconds), "epoch_seconds": float(seconds),
                        "test_accuracy": tested})
    shared = torch.tensor([h["test_accuracy"] for h in history], dtype=torch.float64)
    td.broadcast(shared, 0)
    for h, value in zip(history, shared.tolist()):
        h["test_accuracy"] = value
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"samples_per_sec": float(np.mean([h["samples_per_sec"] for h in history])),
                                                   "test_accuracy": history[-1]["test_accuracy"], "history": history,
                                                   "world_size": size}))
