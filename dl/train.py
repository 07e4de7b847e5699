"""One training loop for 1 or N processes. The launcher passes a `Dist` (in-process or Horovod);
nothing here knows which one it got."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn


class Dist(Protocol):
    rank: int
    size: int

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all workers."""

    def min(self, value: int) -> int:
        """Minimum over all workers."""

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make all workers start equal and return the optimizer to step with."""


class SingleProcess:
    rank, size = 0, 1

    def sum(self, values):
        return list(values)

    def min(self, value):
        return value

    def prepare(self, model, optimizer):
        return optimizer


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    lr_schedule: str = "constant"  # constant | cosine (annealed to 0 over all steps)


def fit(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: FitConfig,
    dist: Dist = SingleProcess(),
    on_epoch: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train on this worker's shard; returns per-epoch metrics (the same on every worker).

    Every worker takes the same number of steps per epoch (the smallest shard decides), so
    uneven shards never leave one worker waiting in an allreduce.
    """
    torch.manual_seed(cfg.seed)
    x_train, y_train = torch.from_numpy(train[0]), torch.from_numpy(train[1]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = dist.prepare(model, optimizer)
    steps = dist.min(len(x_train) // cfg.batch_size)
    if steps == 0:
        raise ValueError(f"a worker's shard holds {len(x_train)} rows, fewer than one batch of {cfg.batch_size}")
    schedule = None
    if cfg.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict] = []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.from_numpy(np.random.default_rng([cfg.seed, epoch, dist.rank]).permutation(len(x_train)))
        loss_sum = correct = 0.0
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            optimizer.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        seen = steps * cfg.batch_size
        val_loss, val_correct, val_n = _evaluate(model, val, cfg.batch_size * 4, loss_fn)
        seconds = time.perf_counter() - t0
        totals = dist.sum([loss_sum, correct, seen, val_loss, val_correct, val_n])
        metrics = {
            "epoch": epoch,
            "loss": totals[0] / totals[2],
            "accuracy": totals[1] / totals[2],
            "val_loss": totals[3] / max(totals[5], 1),
            "val_accuracy": totals[4] / max(totals[5], 1),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_sec": totals[2] / seconds,
            "epoch_seconds": seconds,
        }
        history.append(metrics)
        if dist.rank == 0:
            eta = (time.perf_counter() - started) / epoch * (cfg.epochs - epoch)
            log(
                f"epoch {epoch}/{cfg.epochs}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
                f"{metrics['samples_per_sec']:.0f} samples/s  ETA {eta:.0f}s"
            )
            if on_epoch is not None:
                on_epoch(metrics)
    return history


@torch.no_grad()
def _evaluate(model: nn.Module, data: tuple[np.ndarray, np.ndarray], batch_size: int, loss_fn) -> tuple[float, float, int]:
    model.eval()
    x, y = torch.from_numpy(data[0]), torch.from_numpy(data[1]).long()
    loss_sum = correct = 0.0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        loss_sum += loss_fn(logits, yb).item() * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
    return loss_sum, correct, len(x)
