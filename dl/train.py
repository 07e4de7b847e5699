"""One training loop for 1 or N processes. The launcher passes a `Dist` (in-process, Horovod or
torch.distributed); nothing here knows which one it got.

Sync modes: "allreduce" averages gradients across workers every step (synchronous SGD);
"average" lets each worker take `average_every` local optimizer steps on its shard, then averages
parameters, buffers and optimizer state (parameter averaging, as Deeplearning4j's Spark trainer
did). Randomness (shuffle order, dropout) is derived from (seed, epoch, rank), so a run resumed
from a checkpoint replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

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

    def average_(self, tensor: torch.Tensor) -> None:
        """In place: the mean of `tensor` over all workers."""

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        """In place: `tensor` takes the value it has on `root`."""


class SingleProcess:
    rank, size = 0, 1

    def sum(self, values):
        return list(values)

    def min(self, value):
        return value

    def average_(self, tensor):
        pass

    def broadcast_(self, tensor, root=0):
        pass


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The `train:` section. fit() reads the optimization fields; the launchers and the train stage
    read the rest (backend, workers, device, checkpoints, inputs). Defaults are the documented ones."""

    backend: Literal["horovod", "torch_distributor", "local"] = "horovod"  # the launcher (dlpipe.launchers)
    num_workers: int = 2  # Spark tasks, one worker each (horovod, torch_distributor)
    # elastic (horovod): a lost worker is dropped and the rest go on from the last commit; one that
    # comes back is taken in at the next commit. min/max_workers 0 = num_workers
    elastic: bool = False
    min_workers: int = 0  # fewer left than this: the run fails after elastic_timeout_s (then resume: auto)
    max_workers: int = 0
    commit_every: int = 100  # elastic: steps between in-memory commits (and every epoch's end)
    elastic_timeout_s: int = 120  # elastic: how long to wait for min_workers after a loss
    use_gpu: Literal["auto", True, False] = "auto"  # auto: CUDA when the worker has one
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 adds a gradient scaler
    sync: Literal["allreduce", "average"] = "allreduce"  # average gradients every step | parameter averaging
    average_every: int = 8  # sync: average -> local steps between averages of parameters and optimizer state
    overlap: bool = False  # allreduce: start averaging each gradient as backward produces it (Horovod; slower on 2 cores)
    epochs: int = 6
    batch_size: int = 64  # per worker; the global batch is batch_size * workers
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.0  # sgd only
    lr: float = 0.002
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: annealed to 0 over all steps
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr * workers, reached after warmup_epochs
    warmup_epochs: int = 0
    weight_decay: float = 0.0
    clip_grad_norm: float = 0.0  # > 0: rescale the gradient (after averaging over workers) to at most this L2 norm
    shuffle: bool = True  # reshuffle each worker's shard every epoch (from seed, epoch, rank)
    seed: int = 42
    max_rows: int = 0  # per split; 0 = every row of the input tables (tests use small slices)
    run_name: str = ""  # checkpoints and resume are per run name; "" = registry.model_name
    checkpoint_uri: str = "checkpoints"  # local path, file://, s3:// or hdfs:// (written by the main rank)
    checkpoint_every: int = 1  # epochs; 0 = no checkpoints
    resume: Literal["auto", "never"] = "auto"  # auto: continue the latest unfinished run of run_name
    init_from: str = ""  # "" or models:/<name>@<alias> (or /<version>): start from its weights, new head
    freeze: Literal["none", "features"] = "none"  # features: only the head is trained (needs init_from)
    # greedy: before `epochs` end-to-end epochs, pretrain_epochs epochs per layer, one layer at a time
    # (a model with layers to pretrain: the autoencoder); the epochs are numbered through both
    pretrain: Literal["none", "greedy"] = "none"
    pretrain_epochs: int = 1
    # input tables {train, val, test: <uri> or <uri>@<version>}; {} = the newest set one prepare job wrote
    tables: dict[str, str] = field(default_factory=dict)


METRICS = {"classification": "accuracy", "regression": "mae", "reconstruction": "mse", "clustering": "te",
           "language_model": "bpc",  # bits per token (a character-level model: per character)
           "recommendation": "rmse",  # root mean squared error over the rated entries
           "embedding": "pair_accuracy"}  # word2vec: the share of true-neighbour / noise decisions it gets right
FINISH = {"rmse": math.sqrt}  # an epoch figure summed as squares


def metric_name(task: str) -> str:
    """The second figure of every epoch besides the loss (a model with its own objective sums it)."""
    return METRICS[task]


def fit(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: TrainConfig,
    dist: Dist = SingleProcess(),
    *,
    task: str = "classification",
    device: torch.device = torch.device("cpu"),
    resume: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    stop: Callable[[dict], bool] | None = None,
    log: Callable[[str], None] = print,
    commit: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train on this worker's shard; returns per-epoch metrics (the same on every worker).

    Every epoch ends with the same model on every worker (under allreduce the weights are equal
    and the floating buffers, batch-norm statistics, are averaged; under average everything is),
    so the validation figures are those of the model rank 0 saves, over all workers' val shards.

    Every worker takes the same number of steps per epoch (the smallest shard decides), so
    uneven shards never leave one worker waiting in a collective. `on_epoch` and
    `save_checkpoint` are called on rank 0 only; `resume` is a state from `save_checkpoint`.
    `stop` (given on every rank, asked on rank 0 after each epoch, its answer shared by all) ends
    the run early: a tuning trial its pruner gives up on.

    A model may own its objective, `objective(x, y) -> (loss, sum of the epoch figure[, count])` (an
    autoencoder's reconstruction loss; count: what the figure is averaged over when it is not the
    rows, a recommender's rated entries), and report more epoch figures, `epoch_metrics(val x) ->
    {name: sum over rows}` (logged as val_<name>, averaged over every worker's rows); a model with
    `train_epoch` takes its epochs itself (a batch SOM summing statistics over workers, word2vec's own
    SGD) unless its `trains_itself` is False: `train_epoch(x, epoch, epochs, dist, lr=, sync_rows=,
    seed=, shuffle=) -> (loss sum, figure sum[, count])`, given train.lr, the rows between syncs
    (batch_size, times average_every under sync: average), a seed per (epoch, rank) and
    train.shuffle; count is what the loss is averaged over (word2vec: its pairs), the rows by
    default. Everything else here is the same for every model. With `train.pretrain: greedy` a
    model with `pretrain_layers` is told which layer each of the first pretrain_layers *
    pretrain_epochs epochs pretrains (`set_pretraining`), then None.

    Elastic training passes `commit`: then `train` holds every training row on every worker, each
    epoch is one permutation of all rows dealt out in global batches of batch_size * dist.size, and
    every cfg.commit_every steps and at each epoch's end (on every rank) the loop calls
    commit(snapshot), a copy of everything needed to go on from there. Called again after the world
    changed, with resume=snapshot, fit goes on from that point with the new world size: every row is
    still trained once per epoch, and the lr schedule counts samples, not steps.
    """
    model.to(device)
    pretrained = getattr(model, "pretrain_layers", 0) * cfg.pretrain_epochs if cfg.pretrain == "greedy" else 0
    if cfg.pretrain == "greedy" and not pretrained:
        raise ValueError(f"train.pretrain=greedy: {type(model).__name__} has no layers to pretrain")
    cfg = dataclasses.replace(cfg, epochs=cfg.epochs + pretrained)  # the schedule, checkpoints and logs count all
    x_train, y_train = torch.from_numpy(train[0]), _targets(train[1], task)
    elastic = commit is not None
    # elastic: steps of the schedule (global batches at num_workers), whatever the world size is
    steps = len(x_train) // (cfg.batch_size * cfg.num_workers) if elastic else dist.min(len(x_train) // cfg.batch_size)
    if steps == 0:
        raise ValueError(f"a worker's shard holds {len(x_train)} rows, fewer than one batch of {cfg.batch_size}")
    own = getattr(model, "trains_itself", hasattr(model, "train_epoch"))
    learner = _OwnEpochs(model, cfg, dist) if own else _Gradient(model, cfg, dist, device, steps, task)
    if elastic and isinstance(learner, _OwnEpochs):
        raise ValueError(f"train.elastic: {type(model).__name__} trains whole epochs itself; elastic training needs "
                         "a model trained by gradient steps")
    start_epoch, within = 1, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        learner.load(resume)
        start_epoch = int(resume["epoch"]) + 1
        within = resume.get("within")  # an elastic commit inside that epoch: where it stood
    for tensor in model.state_dict().values():  # every worker starts from rank 0's state
        dist.broadcast_(tensor, 0)
    history: list[dict] = list(resume.get("history", [])) if resume else []
    if dist.rank == 0 and resume is not None:
        log(f"resuming after epoch {start_epoch - 1}/{cfg.epochs}")
    name = metric_name(task)
    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        if pretrained:
            model.set_pretraining((epoch - 1) // cfg.pretrain_epochs if epoch <= pretrained else None)
        if elastic:
            loss_sum, figure_sum, counted, seen, train_seconds = learner.elastic_epoch(
                x_train, y_train, epoch, within,
                lambda at, done=epoch - 1: commit(_snapshot(model, learner, done, done * steps, history, at)))
            within = None
        else:
            loss_sum, figure_sum, counted, seen = learner.epoch(x_train, y_train, epoch)
            train_seconds = time.perf_counter() - t0
        t_val = time.perf_counter()
        val_loss, val_figure, val_n = _evaluate(model, val, cfg.batch_size * 4, _loss(task), device, task)
        extra = _epoch_metrics(model, val[0], cfg.batch_size * 4, device)
        seconds = train_seconds + time.perf_counter() - t_val
        totals = dist.sum([loss_sum, figure_sum, counted, seen, val_loss, val_figure, val_n, len(val[0]), *extra.values()])
        finish = FINISH.get(name, lambda v: v)
        metrics = {
            "epoch": epoch,
            "loss": totals[0] / totals[2],
            name: finish(totals[1] / totals[2]),
            "val_loss": totals[4] / max(totals[6], 1),
            f"val_{name}": finish(totals[5] / max(totals[6], 1)),
            **{f"val_{k}": v / max(totals[7], 1) for k, v in zip(extra, totals[8:])},
            "lr": learner.lr(),
            "samples_per_sec": totals[3] / train_seconds,  # all workers, training only
            "worker_samples_per_sec": seen / train_seconds,  # this rank's training throughput
            "epoch_seconds": seconds,
            **({"samples": totals[3]} if elastic else {}),  # rows trained this epoch, over every world size it saw
        }
        history.append(metrics)
        if dist.rank == 0:
            done = epoch - start_epoch + 1
            eta = (time.perf_counter() - started) / done * (cfg.epochs - epoch)
            phase = f"pretraining layer {(epoch - 1) // cfg.pretrain_epochs + 1}  " if epoch <= pretrained else ""
            log(
                f"epoch {epoch}/{cfg.epochs}  {phase}loss {metrics['loss']:.4f}  {name} {metrics[name]:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  val_{name} {metrics[f'val_{name}']:.4f}  "
                f"{metrics['samples_per_sec']:.0f} samples/s  ETA {eta:.0f}s"
            )
            # checkpoint first: a crash in between loses at most one epoch's metrics, never repeats one
            if save_checkpoint is not None and cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
                save_checkpoint({"model": model.state_dict(), **learner.state(), "epoch": epoch,
                                 "step": epoch * steps, "history": history})
            if on_epoch is not None:
                on_epoch(metrics)
        if elastic:  # after rank 0 logged the epoch: a worker that comes back now is taken in from here
            commit(_snapshot(model, learner, epoch, epoch * steps, history, None))
        if stop is not None and dist.sum([float(dist.rank == 0 and stop(metrics))])[0] > 0:
            break
    if getattr(learner, "overlap", None) is not None:
        learner.overlap.remove()
    return history


def _snapshot(model: nn.Module, learner, epoch: int, step: int, history: list[dict], within: dict | None) -> dict:
    """A copy of the training state after `epoch` whole epochs (and, `within` the next, up to its position)."""
    return copy.deepcopy({"model": model.state_dict(), **learner.state(), "epoch": epoch, "step": step,
                          "history": history, "within": within})


class _Gradient:
    """An epoch of optimizer steps on this worker's shard, gradients averaged every step
    (allreduce) or parameters and optimizer state every `average_every` steps (average)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, dist: Dist, device: torch.device, steps: int, task: str):
        if cfg.freeze == "features":
            model.features.requires_grad_(False)
        self.model, self.cfg, self.dist, self.device, self.steps = model, cfg, dist, device, steps
        self.optimizer = _optimizer(model, cfg)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(cfg, steps, dist.size))
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.objective = _objective(model, _loss(task), task == "classification")
        # a model's own objective may set gradients itself or run backward twice: averaged after backward
        self.overlap = _Overlap(model, dist) if (cfg.overlap and cfg.sync == "allreduce" and dist.size > 1 and
                                                 hasattr(dist, "start_average_") and not hasattr(model, "objective")) else None

    def load(self, resume: dict) -> None:
        self.optimizer.load_state_dict(resume["optimizer"])
        self.schedule.load_state_dict(resume["schedule"])
        if self.scaler is not None and resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def epoch(self, x_train: torch.Tensor, y_train: torch.Tensor, epoch: int) -> tuple[float, float, int]:
        model, cfg, dist = self.model, self.cfg, self.dist
        model.train()
        if cfg.freeze == "features":
            model.features.eval()  # frozen batch-norm statistics do not move either
        torch.manual_seed(_seed(cfg.seed, epoch, dist.rank))
        order = np.random.default_rng([cfg.seed, epoch, dist.rank]).permutation(len(x_train)) if cfg.shuffle else np.arange(len(x_train))
        order = torch.from_numpy(order)
        loss_sum = correct = counted = 0.0
        for step in range(self.steps):
            loss, figure, n = self._step(x_train, y_train, order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            self.schedule.step()
            if cfg.sync == "average" and dist.size > 1 and (step + 1) % cfg.average_every == 0:
                _average_state(model, self.optimizer, dist)
            loss_sum += loss.item() * n
            correct += float(figure)
            counted += n
        if cfg.sync == "average" and dist.size > 1:
            _average_state(model, self.optimizer, dist)  # every worker ends the epoch with the same model
        elif dist.size > 1:  # allreduce kept the weights equal; batch-norm statistics are per worker until now
            _average_tensors([b for b in model.buffers() if b.is_floating_point()], dist)
        return loss_sum, correct, counted, self.steps * cfg.batch_size

    def _step(self, x_train: torch.Tensor, y_train: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """One optimizer step on rows `idx` (gradients averaged as cfg.sync says): (loss, figure sum, count)."""
        xb, yb = x_train[idx].to(self.device, non_blocking=True), y_train[idx].to(self.device, non_blocking=True)
        self.optimizer.zero_grad()
        with _autocast(self.device, self.cfg.precision):
            loss, figure, n = _counted(self.objective(xb, yb), len(yb))
        _backward_and_step(loss, self.model, self.optimizer, self.scaler, self.dist, self.cfg, self.overlap)
        return loss, figure, n

    def elastic_epoch(self, x_train: torch.Tensor, y_train: torch.Tensor, epoch: int, within: dict | None,
                      commit: Callable[[dict], None]) -> tuple[float, float, float, float, float]:
        """An epoch over every row once: one permutation of all rows (from seed and epoch), dealt out
        in global batches of batch_size * world size from `within`'s position (a commit inside this
        epoch) on. Each rank's share of the epoch figures comes back (rank 0's includes what was
        committed before), and the epoch's training seconds."""
        model, cfg, dist = self.model, self.cfg, self.dist
        model.train()
        if cfg.freeze == "features":
            model.features.eval()
        at = within or {"position": 0, "sums": [0.0, 0.0, 0.0, 0.0], "seconds": 0.0}
        position = at["position"]
        torch.manual_seed(_seed(cfg.seed, epoch, dist.rank) + position)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(x_train)) if cfg.shuffle else np.arange(len(x_train))
        order = torch.from_numpy(order)
        width, sums, taken, t0 = cfg.batch_size * dist.size, [0.0, 0.0, 0.0, 0.0], 0, time.perf_counter()
        while position + width <= len(x_train):
            loss, figure, n = self._step(
                x_train, y_train, order[position + dist.rank * cfg.batch_size : position + (dist.rank + 1) * cfg.batch_size])
            position += width
            # the schedule's step: samples so far over the global batch at num_workers
            self.schedule.last_epoch = (epoch - 1) * self.steps + position // (cfg.batch_size * cfg.num_workers) - 1
            self.schedule.step()
            taken += 1
            if cfg.sync == "average" and dist.size > 1 and taken % cfg.average_every == 0:
                _average_state(model, self.optimizer, dist)
            sums = [sums[0] + loss.item() * n, sums[1] + float(figure), sums[2] + n, sums[3] + cfg.batch_size]
            if taken % cfg.commit_every == 0 and position + width <= len(x_train):
                if cfg.sync == "average" and dist.size > 1:
                    _average_state(model, self.optimizer, dist)  # one model to commit
                at = {"position": position, "sums": [a + b for a, b in zip(at["sums"], dist.sum(sums))],
                      "seconds": at["seconds"] + time.perf_counter() - t0}
                sums, t0 = [0.0, 0.0, 0.0, 0.0], time.perf_counter()
                commit(at)
        if cfg.sync == "average" and dist.size > 1:
            _average_state(model, self.optimizer, dist)
        elif dist.size > 1:
            _average_tensors([b for b in model.buffers() if b.is_floating_point()], dist)
        if dist.rank == 0:  # what was committed before counts once, on rank 0
            sums = [a + b for a, b in zip(at["sums"], sums)]
        return (*sums, at["seconds"] + time.perf_counter() - t0)


class _OwnEpochs:
    """A model that takes its epochs itself: its `train_epoch` on the whole shard, its state
    entirely in its state dict, its `rate` the reported lr."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, dist: Dist):
        self.model, self.cfg, self.dist = model, cfg, dist

    def load(self, resume: dict) -> None:
        pass

    def state(self) -> dict:
        return {}

    def lr(self) -> float:
        return float(getattr(self.model, "rate", 0.0))

    def epoch(self, x_train: torch.Tensor, y_train: torch.Tensor, epoch: int) -> tuple[float, float, int, int]:
        cfg = self.cfg
        self.model.train()
        out = self.model.train_epoch(x_train, epoch, cfg.epochs, self.dist, lr=cfg.lr, shuffle=cfg.shuffle,
                                     seed=_seed(cfg.seed, epoch, self.dist.rank),
                                     sync_rows=cfg.batch_size * (cfg.average_every if cfg.sync == "average" else 1))
        return out[0], out[1], out[2] if len(out) > 2 else len(x_train), len(x_train)


def _counted(out: tuple, rows: int) -> tuple[torch.Tensor, float, float]:
    """An objective's (loss, figure sum[, count]) as (loss, figure sum, count); count defaults to the rows."""
    return out[0], float(out[1]), float(out[2]) if len(out) > 2 else float(rows)


@torch.no_grad()
def _epoch_metrics(model: nn.Module, x: np.ndarray, batch_size: int, device) -> dict[str, float]:
    """The model's own extra figures over this worker's val rows (sums), {} when it has none. The
    keys must not depend on the rows: every worker sums the same list."""
    if not hasattr(model, "epoch_metrics"):
        return {}
    model.eval()
    x = torch.from_numpy(x)
    sums: dict[str, float] = {}
    for start in range(0, max(len(x), 1), batch_size):
        for k, v in model.epoch_metrics(x[start : start + batch_size].to(device)).items():
            sums[k] = sums.get(k, 0.0) + (v if len(x) else 0.0)
    return sums


def _objective(model: nn.Module, loss_fn, classify: bool):
    """(x, y) -> (loss, sum over the batch of the epoch figure): the model's own when it has one."""
    if hasattr(model, "objective"):
        return model.objective

    def objective(x: torch.Tensor, y: torch.Tensor):
        out = model(x)
        return loss_fn(out.float(), y), _metric_sum(out.detach().float(), y, classify)

    return objective


def _targets(y: np.ndarray, task: str) -> torch.Tensor:
    return torch.from_numpy(y).long() if task == "classification" else torch.from_numpy(np.asarray(y, np.float32))


def _loss(task: str):
    if task == "classification":
        return nn.CrossEntropyLoss()
    mse = nn.MSELoss()
    return lambda out, y: mse(out.reshape(-1), y)


def _metric_sum(out: torch.Tensor, y: torch.Tensor, classify: bool) -> float:
    """Correct predictions (classification) or the sum of absolute errors (regression)."""
    if classify:
        return (out.argmax(1) == y).sum().item()
    return (out.reshape(-1) - y).abs().sum().item()


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        # fused: one kernel over all parameters (on the CPU 4x faster than the default for-each update:
        # 3.5 ms against 14 ms for word2vec's two 14,194 x 100 tables, docs/performance.md)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected adam or sgd)")


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> Callable[[int], float]:
    """Multiplier of the base lr after `step` steps: linear scaling with warmup, then the schedule."""
    total = cfg.epochs * steps_per_epoch
    peak = world_size if cfg.lr_scaling == "linear" else 1.0
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:  # from the single-worker lr up to the scaled lr
            return 1.0 + (peak - 1.0) * step / warmup
        if cfg.lr_schedule == "cosine":
            progress = (step - warmup) / max(total - warmup, 1)
            return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return peak

    return factor


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Overlap:
    """Averaging that overlaps backward: a hook on each parameter starts its gradient's average the
    moment autograd has accumulated it (a Dist's start_average_, e.g. Horovod's allreduce_async_,
    whose tensor fusion batches those that arrive together), so communication runs while backward
    computes the layers below; `finish` waits for them after backward."""

    def __init__(self, model: nn.Module, dist: Dist):
        self.dist, self.started = dist, {}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: self._ready(i, p)) for i, p in enumerate(self.params)]

    def _ready(self, i: int, p: torch.Tensor) -> None:
        if i not in self.started:
            self.started[i] = self.dist.start_average_(p.grad, f"grad.{i}")

    def finish(self) -> None:
        """Every gradient averaged: those started during backward waited for, any other (a gradient
        that autograd did not produce) averaged now, in one collective."""
        for handle in self.started.values():
            self.dist.finish_(handle)
        _average_tensors([p.grad for i, p in enumerate(self.params) if p.grad is not None and i not in self.started],
                         self.dist)
        self.started = {}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _backward_and_step(loss, model, optimizer, scaler, dist: Dist, cfg: TrainConfig, overlap: _Overlap | None = None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()
    if overlap is not None:
        overlap.finish()  # averaged while scaled: the same as unscaling first
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if cfg.sync == "allreduce" and dist.size > 1 and overlap is None:
        _average_tensors(grads, dist)
    if cfg.clip_grad_norm > 0:  # the same averaged gradients on every worker: the same clipped step
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.clip_grad_norm)
    if scaler is None:
        optimizer.step()
        return
    # After averaging, grads are identical on every worker, so all workers agree on skipping a
    # step with inf/nan gradients (each scaler only saw its own, pre-average gradients).
    if all(torch.isfinite(g).all() for g in grads):
        scaler.step(optimizer)
    scaler.update()


def _average_tensors(tensors: list[torch.Tensor], dist: Dist) -> None:
    """One collective for many tensors: flatten, average, copy back."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.average_(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _average_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> None:
    """Parameter averaging: weights, floating buffers (batch-norm statistics) and the optimizer's
    floating state (momentum, Adam moments) become their mean over workers."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    for state in optimizer.state.values():
        tensors += [v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and k != "step"]
    _average_tensors(tensors, dist)


def _seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@torch.no_grad()
def _evaluate(model: nn.Module, data: tuple[np.ndarray, np.ndarray], batch_size: int, loss_fn, device,
              task: str = "classification") -> tuple[float, float, int]:
    model.eval()
    x, y = torch.from_numpy(data[0]), _targets(data[1], task)
    objective = _objective(model, loss_fn, task == "classification")
    loss_sum = correct = counted = 0.0
    for start in range(0, len(x), batch_size):
        yb = y[start : start + batch_size].to(device)
        loss, figure, n = _counted(objective(x[start : start + batch_size].to(device), yb), len(yb))
        loss_sum += loss.item() * n
        correct += figure
        counted += n
    return loss_sum, correct, counted
