"""The one plain PyTorch training loop every benchmark baseline uses: a single process, Adam (fused, as dlpipe's),
cross-entropy, the net built the way dlpipe builds it, no dlpipe code on the hot path. Its
learning-rate schedule and thread budget are parameters, so a baseline runs with the same ones as
the dlpipe run it is compared with (and its summary says which it used)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from dl.models import Net, build


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[np.ndarray, np.ndarray], batch: int = 2048) -> float:
    model.eval()
    x, y = torch.from_numpy(data[0]), torch.from_numpy(np.asarray(data[1])).long()
    correct = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / max(len(x), 1)


def plain_fit(net: Net, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *, epochs: int,
              batch_size: int, lr: float, lr_schedule: str = "constant", seed: int = 0, threads: int = 1,
              on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train `net` on `train` for `epochs` full epochs (shuffled, drop-last batches); the learning
    rate is constant or cosine-annealed to 0 over all steps (dlpipe's `train.lr_schedule`). Returns
    test accuracy, samples/s over the training steps only, wall time and the settings used."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()
    x, y = torch.from_numpy(np.ascontiguousarray(train[0], np.float32)), torch.from_numpy(np.asarray(train[1])).long()
    model = build(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # the same update as dlpipe's (dl.train)
    steps = len(x) // batch_size
    if steps == 0:
        raise ValueError(f"{len(x)} training rows are fewer than one batch of {batch_size}")
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps) if lr_schedule == "cosine"
                else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    loss_fn = nn.CrossEntropyLoss()
    train_seconds, samples, history = 0.0, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x))
        t0 = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
            samples += len(idx)
        train_seconds += time.perf_counter() - t0
        metrics = {"epoch": epoch, "test_accuracy": accuracy(model, test), "elapsed_s": time.perf_counter() - started,
                   "samples_per_sec": samples / train_seconds, "lr": optimizer.param_groups[0]["lr"]}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    return {"test_accuracy": history[-1]["test_accuracy"], "samples_per_sec": samples / train_seconds,
            "train_wall_s": time.perf_counter() - started, "epochs": epochs, "lr_schedule": lr_schedule,
            "final_lr": history[-1]["lr"], "batch_size": batch_size, "torch_threads": threads, "processes": 1,
            "history": history}
