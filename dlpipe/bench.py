"""`dlpipe bench training`: samples/s and time to a target test accuracy of the CNN on the
prepared tables, for a bare PyTorch loop written here and for each dlpipe launcher, all in one run
with one torch thread per worker. `dlpipe bench score`: see score() below."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from dl.models import CNN, CNNConfig
from dl.train import FitConfig
from dlpipe import lake
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


def score(spark, cfg: Config) -> dict:
    """`dlpipe bench score`: rows/s of the score job's path (predict with the model shipped once
    per executor process, whole Arrow batches, Delta write) against (a) a plain in-process
    PyTorch loop over the same rows and (b) mlflow.pyfunc.spark_udf with default settings, which
    also writes the same Delta output. All on the pinned train table (the most rows), one run,
    after an untimed warm-up that starts every Spark Python worker; the Spark paths alternate
    twice and each keeps its faster run."""
    import shutil
    import tempfile
    from pathlib import Path

    import mlflow
    from pyspark.sql import functions as F

    from dlpipe import tracking
    from dlpipe.scoring import predict

    tracking.setup(cfg.mlflow)
    model_uri = cfg.score.model_uri or f"models:/{cfg.registry.model_name}@champion"
    uri = cfg.table_uri("train")
    version = lake.latest_version(uri)
    if version is None:
        raise FileNotFoundError(f"no Delta table at {uri}: run `dlpipe prepare` first")
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tempfile.mkdtemp(prefix="dlpipe-bench-"))
    out = Path(tempfile.mkdtemp(prefix="dlpipe-bench-out-"))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.score.batch_size))
    runs = {}

    # (a) plain PyTorch: read the same parquet files, run the exported program batch by batch
    started = time.perf_counter()
    meta = json.loads(Path(local, "artifacts", "meta.json").read_text())
    module = torch.export.load(str(Path(local, "artifacts", "model.pt2"))).module()
    x, _ = _read(lake.table_files(uri, version), tuple(meta["input_shape"]))
    predicted = []
    with torch.no_grad():
        for i in range(0, len(x), cfg.score.batch_size):
            predicted.append(torch.softmax(module(x[i : i + cfg.score.batch_size]), dim=1).argmax(1))
    rows = len(torch.cat(predicted))
    runs["a_plain_pytorch_in_process"] = {"rows": rows, "seconds": time.perf_counter() - started}
    print(f"bench score: (a) plain PyTorch {rows} rows in {runs['a_plain_pytorch_in_process']['seconds']:.1f} s", flush=True)

    # warm-up, not timed: every Spark Python worker starts (and imports torch) for both paths
    images = lake.read_table(spark, uri, version)
    warm = images.limit(256).repartition(spark.sparkContext.defaultParallelism)
    udf = mlflow.pyfunc.spark_udf(spark, local)
    predict(spark, warm, local).count()
    warm.select(udf(F.struct("pixels")).alias("out")).select("out.prediction").collect()

    def dlpipe_score(i: int) -> int:  # the score job's path: dlpipe.scoring.predict + one Delta commit
        frame = predict(spark, images, local).select("key", "prediction", "label_name", "probabilities")
        return lake.read_table(spark, str(out / "dlpipe"), lake.write_table(frame, str(out / "dlpipe"))).count()

    def spark_udf(i: int) -> int:
        # a fresh copy of the model: like the score job, each timed run loads it once per worker
        # process instead of finding it in spark_udf's per-process cache
        fresh = shutil.copytree(local, Path(tempfile.mkdtemp(prefix="dlpipe-bench-udf-")) / "model")
        udf = mlflow.pyfunc.spark_udf(spark, str(fresh))
        scored = images.select("key", udf(F.struct("pixels")).alias("out")).select(
            "key", "out.prediction", "out.label_name", "out.probabilities")
        return lake.read_table(spark, str(out / "udf"), lake.write_table(scored, str(out / "udf"))).count()

    # alternate the two Spark paths twice (A B A B) and keep each one's faster run: the machine's
    # load moves between runs
    for i in range(2):
        for name, fn in (("dlpipe_score", dlpipe_score), ("b_mlflow_spark_udf", spark_udf)):
            started = time.perf_counter()
            rows = fn(i)
            seconds = time.perf_counter() - started
            print(f"bench score: {name} round {i + 1}: {rows} rows in {seconds:.1f} s", flush=True)
            if name not in runs or seconds < runs[name]["seconds"]:
                runs[name] = {"rows": rows, "seconds": seconds, "rounds": 2}
    for run in runs.values():
        run["rows_per_sec"] = run["rows"] / run["seconds"]
    ours = runs["dlpipe_score"]["rows_per_sec"]
    return {
        "step": "bench score", "model_uri": model_uri, "table": {"uri": uri, "version": version},
        "batch_size": cfg.score.batch_size, "spark_master": spark.sparkContext.master,
        "torch_threads_in_process": torch.get_num_threads(), "runs": runs,
        "ratios": {"score_over_plain_pytorch": ours / runs["a_plain_pytorch_in_process"]["rows_per_sec"],
                   "score_over_spark_udf": ours / runs["b_mlflow_spark_udf"]["rows_per_sec"]},
        "goals": {"score_over_plain_pytorch": ">= 0.8", "score_over_spark_udf": "> 1.0"},
    }
