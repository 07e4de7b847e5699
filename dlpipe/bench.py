"""`dlpipe bench training`: samples/s and time to a target test accuracy of the CNN on the
prepared tables, for a bare PyTorch loop written here and for each dlpipe launcher, all in one run
with one torch thread per worker.
`dlpipe bench prepare`: rows/s and MB/s of each prepare pipeline on Spark against a plain
single-process script doing the same decode and normalize over the same landed files."""

from __future__ import annotations

import dataclasses
import io
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from dl.models import CNN, CNNConfig
from dl.train import FitConfig
from dlpipe import lake, storage
from dlpipe.config import Config
from dlpipe.launch import TrainTask, launch

TARGET_ACCURACY = 0.88


def _read(files: list[str], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.ParquetDataset(files).read(columns=["label", "pixels"])
    x = pc.list_flatten(table.column("pixels")).to_numpy().reshape(-1, *shape)
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(table.column("label").to_numpy().astype(np.int64))


def bare_loop(model_cfg: CNNConfig, fit: FitConfig, train_files: list[str], test_files: list[str]) -> dict:
    """(a) the baseline: a plain single-process PyTorch loop, no dlpipe code on the hot path."""
    torch.set_num_threads(1)
    torch.manual_seed(fit.seed)
    started = time.perf_counter()
    shape = (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    x, y = _read(train_files, shape)
    xt, yt = _read(test_files, shape)
    model = CNN(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=fit.lr)
    loss_fn = nn.CrossEntropyLoss()
    train_seconds, samples, reached, accuracy = 0.0, 0, None, 0.0
    for epoch in range(1, fit.epochs + 1):
        model.train()
        order = torch.randperm(len(x))
        t0 = time.perf_counter()
        for start in range(0, len(x) - fit.batch_size + 1, fit.batch_size):
            idx = order[start : start + fit.batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            samples += len(idx)
        train_seconds += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            accuracy = float(sum((model(xt[i : i + 1024]).argmax(1) == yt[i : i + 1024]).sum() for i in range(0, len(xt), 1024)) / len(xt))
        if reached is None and accuracy >= TARGET_ACCURACY:
            reached = time.perf_counter() - started
        print(f"bare loop: epoch {epoch}/{fit.epochs}  test_acc {accuracy:.4f}  {samples / train_seconds:.0f} samples/s", flush=True)
    return {"samples_per_sec": samples / train_seconds, "time_to_target_s": reached, "test_accuracy": accuracy,
            "wall_s": time.perf_counter() - started}


def _dlpipe_run(spark, task: TrainTask, backend: str, workers: int) -> dict:
    started = time.perf_counter()
    result = launch(spark, task, backend, workers)
    wall = time.perf_counter() - started
    history = result["history"]
    startup = wall - sum(h["epoch_seconds"] for h in history)
    reached, elapsed = None, startup
    for h in history:
        elapsed += h["epoch_seconds"]
        if reached is None and h["val_accuracy"] >= TARGET_ACCURACY:
            reached = elapsed
    return {"samples_per_sec": float(np.mean([h["samples_per_sec"] for h in history])), "time_to_target_s": reached,
            "test_accuracy": history[-1]["val_accuracy"], "wall_s": wall, "startup_s": startup,
            "world_size": result["world_size"]}


def training(spark, cfg: Config, model_cfg: CNNConfig) -> dict:
    tables = {s: (cfg.table_uri(s), lake.latest_version(cfg.table_uri(s))) for s in ("train", "test")}
    for split, (uri, version) in tables.items():
        if version is None:
            raise FileNotFoundError(f"no Delta table at {uri}: run `dlpipe prepare` first")
    train_files = lake.table_files(*tables["train"])
    test_files = lake.table_files(*tables["test"])
    t = cfg.train
    fit = FitConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed)  # constant lr, Adam
    task = TrainTask(model=model_cfg, fit=fit, train_files=train_files, val_files=test_files,  # "val" = test set
                     max_rows=0, tracking_uri=cfg.mlflow.tracking_uri, run_id="", threads=1)
    averaging = dataclasses.replace(task, fit=dataclasses.replace(fit, sync="average", average_every=8))
    runs = {"a_bare_pytorch_1_process": bare_loop(model_cfg, fit, train_files, test_files)}
    runs["b_dlpipe_local"] = _dlpipe_run(spark, task, "local", 1)
    runs["c_horovod_2_workers"] = _dlpipe_run(spark, task, "horovod", 2)
    runs["d_torch_distributor_2_workers"] = _dlpipe_run(spark, task, "torch_distributor", 2)
    runs["e_horovod_average_k8_2_workers"] = _dlpipe_run(spark, averaging, "horovod", 2)
    bare = runs["a_bare_pytorch_1_process"]["samples_per_sec"]
    return {
        "step": "bench training", "target_test_accuracy": TARGET_ACCURACY, "epochs": t.epochs,
        "batch_size_per_worker": t.batch_size, "torch_threads_per_worker": 1,
        "tables": {s: {"uri": u, "version": v} for s, (u, v) in tables.items()}, "runs": runs,
        "ratios": {
            "local_over_bare": runs["b_dlpipe_local"]["samples_per_sec"] / bare,
            "horovod_2_over_2x_bare": runs["c_horovod_2_workers"]["samples_per_sec"] / (2 * bare),
        },
        "goals": {"local_over_bare": ">= 0.95", "horovod_2_over_2x_bare": ">= 0.85"},
    }


# --- `dlpipe bench prepare` -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrepareCase:
    """One prepare pipeline to measure: `dlpipe` runs it on Spark and returns its summary;
    `baseline` does the same decode and normalize in one plain process (no Spark, no dlpipe)
    over the same files, writes one parquet file and returns the rows it wrote."""

    name: str
    dlpipe: Callable[[Any, Config], dict]
    baseline: Callable[[Config, list[tuple[str, int]], str], int]
    decode_only: Callable[[Any, Config], None] | None = None  # Spark's read + decode alone, for the breakdown


def _images_baseline(cfg: Config, files: list[tuple[str, int]], out: str) -> int:
    """PIL + numpy + pyarrow, single process: decode, resize, scale to [0, 1], channels-first."""
    from PIL import Image

    size, channels, label_of = cfg.data.image_size, cfg.data.channels, {c: i for i, c in enumerate(cfg.data.classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    root = cfg.paths.landing.rstrip("/")
    keys, labels, pixels = [], [], []
    for path, _ in files:
        key = path.split(root.split("://", 1)[-1] + "/", 1)[-1]
        folder = key.split("/")[0]
        if folder not in label_of:
            continue
        with open(storage.path_of(path), "rb") as f, Image.open(io.BytesIO(f.read())) as image:
            array = np.asarray(image.convert(mode).resize((size, size)), dtype=np.float32) / 255.0
        keys.append(key)
        labels.append(label_of[folder])
        pixels.append(array.reshape(size, size, channels).transpose(2, 0, 1).ravel())
    flat = pa.array(np.concatenate(pixels)) if pixels else pa.array([], pa.float32())
    offsets = pa.array(np.arange(0, len(pixels) + 1, dtype=np.int32) * (size * size * channels))
    table = pa.table({"key": keys, "label": pa.array(labels, pa.int32()),
                      "pixels": pa.ListArray.from_arrays(offsets, flat)})
    pq.write_table(table, out)
    return table.num_rows


def _images_dlpipe(spark, cfg: Config) -> dict:
    from dlpipe import steps

    return steps.prepare(spark, cfg)


def _images_decode_only(spark, cfg: Config) -> None:
    from pipelines.images import decode_images
    from pipelines.sources import read_files

    files = read_files(spark, cfg.paths.landing)
    decode_images(files, cfg.paths.landing, cfg.data.classes, cfg.data.image_size, cfg.data.channels) \
        .write.format("noop").mode("overwrite").save()


PREPARE_CASES = [PrepareCase("images", _images_dlpipe, _images_baseline, _images_decode_only)]


def prepare(spark, cfg: Config, cases: list[PrepareCase] | None = None) -> dict:
    """Each case on the same landed files: dlpipe's Spark pipeline (decode + normalize + Delta
    writes, into a scratch lake) against the single-process baseline, in this one run."""
    from pipelines.sources import list_files

    results = {}
    for case in cases or PREPARE_CASES:
        files = list_files(cfg.paths.landing if "://" in cfg.paths.landing else "file://" + cfg.paths.landing)
        megabytes = sum(size for _, size in files) / 1e6
        for path, _ in files:  # warm the page cache: neither run pays for the first disk read
            with open(storage.path_of(path), "rb") as f:
                f.read()
        scratch = tempfile.mkdtemp(prefix=f"dlpipe-bench-prepare-{case.name}-")
        try:
            print(f"bench prepare {case.name}: baseline, 1 process, {len(files)} files ({megabytes:.1f} MB)", flush=True)
            started = time.perf_counter()
            base_rows = case.baseline(cfg, files, f"{scratch}/baseline.parquet")
            base_s = time.perf_counter() - started
            print(f"bench prepare {case.name}: dlpipe on {spark.sparkContext.master}", flush=True)
            run_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, lake=f"{scratch}/lake"))
            started = time.perf_counter()
            summary = case.dlpipe(spark, run_cfg)
            spark_s = time.perf_counter() - started
            decode_s = None
            if case.decode_only is not None:
                started = time.perf_counter()
                case.decode_only(spark, cfg)
                decode_s = time.perf_counter() - started
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows = summary["input_files"] if "input_files" in summary else summary["accepted"] + summary["rejected"]
        results[case.name] = {
            "files": len(files), "megabytes": megabytes,
            "baseline_1_process": {"rows": base_rows, "seconds": base_s, "rows_per_sec": base_rows / base_s,
                                   "mb_per_sec": megabytes / base_s},
            "dlpipe_spark": {"rows": rows, "accepted": summary["accepted"], "seconds": spark_s,
                             "rows_per_sec": rows / spark_s, "mb_per_sec": megabytes / spark_s,
                             "tables": {k: v["version"] for k, v in summary["tables"].items()}},
            "speedup": base_s / spark_s,
            # the same read + decode on Spark, warm, without the split, rejects and Delta writes
            "dlpipe_read_decode_only_seconds": decode_s,
        }
        r = results[case.name]
        print(f"bench prepare {case.name}: baseline {r['baseline_1_process']['rows_per_sec']:.0f} rows/s "
              f"({r['baseline_1_process']['mb_per_sec']:.1f} MB/s), dlpipe {r['dlpipe_spark']['rows_per_sec']:.0f} rows/s "
              f"({r['dlpipe_spark']['mb_per_sec']:.1f} MB/s): {r['speedup']:.2f}x (goal >= 1.5x)", flush=True)
    return {"step": "bench prepare", "spark_master": spark.sparkContext.master,
            "cores": spark.sparkContext.defaultParallelism, "landing": cfg.paths.landing, "cases": results,
            "goal": "speedup >= 1.5 on 2 cores"}
