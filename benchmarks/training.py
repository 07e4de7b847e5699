"""`dlpipe bench training`: samples/s and time to a target test accuracy of the CNN on the
prepared tables, for the plain PyTorch loop (benchmarks.plain_loop) and for each dlpipe launcher,
all in one run with one torch thread per worker and the same constant learning rate (Adam).

The no-communication ceiling is the same 2 Horovod workers, each training on its own shard with
nothing exchanged during the epoch (parameter averaging once, at its end: `sync: average` with
`average_every` beyond the epoch's steps); communication efficiency is a launcher's allreduce
samples/s over that ceiling's. The peer, in the same run when Ray is installed: Ray Train's
TorchTrainer on the same net, shards, batch, schedule and threads (benchmarks.ray_peer)."""

from __future__ import annotations

import dataclasses

from benchmarks import ray_peer
from benchmarks.common import arrays, dlpipe_run, latest_tables, say
from benchmarks.plain_loop import plain_fit
from dl.train import TrainConfig
from dlpipe import lake, modeling
from dlpipe.config import Config
from dlpipe.launchers import TrainTask

TARGET_ACCURACY = 0.88
NO_EXCHANGE = 10**9  # average_every beyond any epoch's steps: the workers exchange nothing until the epoch ends


def _reached(history: list[dict], key: str, start: float = 0.0, elapsed: str = "") -> float | None:
    at = start
    for h in history:
        at = h["elapsed_s"] if elapsed else at + h["epoch_seconds"]
        if h[key] >= TARGET_ACCURACY:
            return at
    return None


def run(spark, cfg: Config) -> dict:
    net = modeling.image_net(cfg.model, cfg.data)
    tables = latest_tables(cfg)
    train_files, test_files = lake.table_files(*tables["train"]), lake.table_files(*tables["test"])
    t = cfg.train
    fit = TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed, lr_schedule="constant",
                      checkpoint_every=0)  # constant lr, Adam: the plain loop's
    task = TrainTask(net=net, train=fit, train_files=train_files, val_files=test_files, threads=1)  # "val" = test set
    averaging = dataclasses.replace(task, train=dataclasses.replace(fit, sync="average", average_every=8))
    ceiling = dataclasses.replace(task, train=dataclasses.replace(fit, sync="average", average_every=NO_EXCHANGE))
    shape = tuple(net.input_shape)
    bare = plain_fit(net, arrays(train_files, shape), arrays(test_files, shape), epochs=t.epochs, batch_size=t.batch_size,
                     lr=t.lr, seed=t.seed, threads=1,
                     on_epoch=lambda m: say(f"bare loop: epoch {m['epoch']}/{t.epochs}  test_acc {m['test_accuracy']:.4f}  "
                                            f"{m['samples_per_sec']:.0f} samples/s"))
    runs = {"a_bare_pytorch_1_process": {"samples_per_sec": bare["samples_per_sec"], "test_accuracy": bare["test_accuracy"],
                                         "time_to_target_s": _reached(bare["history"], "test_accuracy", elapsed="yes"),
                                         "wall_s": bare["train_wall_s"]}}
    for name, job, backend, workers in (("b_dlpipe_local", task, "local", 1), ("c_horovod_2_workers", task, "horovod", 2),
                                        ("d_torch_distributor_2_workers", task, "torch_distributor", 2),
                                        ("e_horovod_average_k8_2_workers", averaging, "horovod", 2),
                                        ("f_no_communication_2_workers", ceiling, "horovod", 2)):
        r = dlpipe_run(spark, job, backend, workers)
        runs[name] = {"samples_per_sec": r["samples_per_sec"], "test_accuracy": r["test_accuracy"],
                      "time_to_target_s": _reached(r["history"], "val_accuracy", start=r["startup_s"]),
                      "wall_s": r["train_wall_s"], "startup_s": r["startup_s"], "world_size": r["world_size"]}
    peer = None
    if ray_peer.available():
        r = ray_peer.ray_fit(net, train_files, test_files, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                             say=say)
        runs["g_ray_torch_trainer_2_workers"] = {
            "samples_per_sec": r["samples_per_sec"], "test_accuracy": r["test_accuracy"],
            "time_to_target_s": _reached(r["history"], "test_accuracy", start=r["startup_s"]), "wall_s": r["train_wall_s"],
            "startup_s": r["startup_s"], "world_size": r["world_size"], "ray_version": r["ray_version"]}
        peer = r["samples_per_sec"]
    else:
        say(f"the Ray peer did not run: Ray Train is not installed ({ray_peer.PEER_INSTALL})")
    base = runs["a_bare_pytorch_1_process"]["samples_per_sec"]
    top = runs["f_no_communication_2_workers"]["samples_per_sec"]
    summary = {
        "step": "bench training", "target_test_accuracy": TARGET_ACCURACY, "epochs": t.epochs,
        "batch_size_per_worker": t.batch_size, "torch_threads_per_worker": 1,
        "tables": {s: {"uri": u, "version": v} for s, (u, v) in tables.items()}, "runs": runs,
        "ratios": {"local_over_bare": runs["b_dlpipe_local"]["samples_per_sec"] / base,
                   "horovod_2_over_2x_bare": runs["c_horovod_2_workers"]["samples_per_sec"] / (2 * base),
                   "comm_efficiency_horovod": runs["c_horovod_2_workers"]["samples_per_sec"] / top,
                   "comm_efficiency_torch_distributor": runs["d_torch_distributor_2_workers"]["samples_per_sec"] / top},
        "goals": {"local_over_bare": ">= 0.95", "horovod_2_over_2x_bare": ">= 0.85", "comm_efficiency_horovod": ">= 0.95",
                  "comm_efficiency_torch_distributor": ">= 0.95"},
        "peer_ray_samples_per_s": peer,  # None: Ray Train not installed, the peer did not run
    }
    if peer:
        summary["ratios"] |= {"horovod_over_ray": runs["c_horovod_2_workers"]["samples_per_sec"] / peer,
                              "torch_distributor_over_ray": runs["d_torch_distributor_2_workers"]["samples_per_sec"] / peer}
        summary["goals"] |= {"horovod_over_ray": ">= 1.0", "torch_distributor_over_ray": ">= 1.0"}
    for name, r in runs.items():
        reached = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f} s"
        say(f"{name}: {r['samples_per_sec']:.0f} samples/s, test accuracy {r['test_accuracy']:.4f}, "
            f"time to {TARGET_ACCURACY}: {reached}")
    for name, ratio in summary["ratios"].items():
        say(f"{name} = {ratio:.2f} (goal {summary['goals'][name]})")
    return summary
