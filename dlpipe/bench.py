"""`dlpipe bench training`: samples/s and time to a target test accuracy of the CNN on the
prepared tables, for a bare PyTorch loop written here and for each dlpipe launcher, all in one run
with one torch thread per worker. `dlpipe bench score`: see score() below.
`dlpipe bench prepare`: rows/s and MB/s of each prepare pipeline on Spark against a plain
single-process script doing the same decode and normalize over the same landed files."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from dl.models import Net, build
from dl.train import FitConfig
from dlpipe import lake, storage
from dlpipe.scoring import binary_auc
from dlpipe.config import Config
from dlpipe.launch import TrainTask, launch

TARGET_ACCURACY = 0.88
REPO = Path(__file__).resolve().parents[1]


def _read(files: list[str], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.ParquetDataset(files).read(columns=["label", "pixels"])
    x = pc.list_flatten(table.column("pixels")).to_numpy().reshape(-1, *shape)
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(table.column("label").to_numpy().astype(np.int64))


def bare_loop(net: Net, fit: FitConfig, train_files: list[str], test_files: list[str]) -> dict:
    """(a) the baseline: a plain single-process PyTorch loop, no dlpipe code on the hot path."""
    torch.set_num_threads(1)
    torch.manual_seed(fit.seed)
    started = time.perf_counter()
    shape = tuple(net.input_shape)
    x, y = _read(train_files, shape)
    xt, yt = _read(test_files, shape)
    model = build(net)
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


def training(spark, cfg: Config, model_cfg: Net) -> dict:
    tables = {s: (cfg.table_uri(s), lake.latest_version(cfg.table_uri(s))) for s in ("train", "test")}
    for split, (uri, version) in tables.items():
        if version is None:
            raise FileNotFoundError(f"no Delta table at {uri}: run `dlpipe prepare` first")
    train_files = lake.table_files(*tables["train"])
    test_files = lake.table_files(*tables["test"])
    t = cfg.train
    fit = FitConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed)  # constant lr, Adam
    task = TrainTask(net=model_cfg, fit=fit, train_files=train_files, val_files=test_files,  # "val" = test set
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
    config: Callable[[Config], Config] | None = None  # the case's own config (and landing) from the run's


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


def _dlpipe_prepare(spark, cfg: Config) -> dict:
    from dlpipe import steps

    return steps.prepare(spark, cfg)


def _images_decode_only(spark, cfg: Config) -> None:
    from pipelines.images import decode_images
    from pipelines.sources import read_files

    files = read_files(spark, cfg.paths.landing)
    decode_images(files, cfg.paths.landing, cfg.data.classes, cfg.data.image_size, cfg.data.channels) \
        .write.format("noop").mode("overwrite").save()


def _tables_baseline(cfg: Config, files: list[tuple[str, int]], out: str) -> int:
    """pyarrow CSV + numpy, single process: parse, drop rows with a missing or non-numeric value
    or an unknown label, standardize the numeric columns (population std) and one-hot the
    categorical ones (sorted vocabularies), numeric first: dlpipe's feature layout. One
    difference, on purpose: statistics are fitted on all rows, not on the hash train split."""
    import pandas as pd
    import pyarrow.csv as pacsv

    t = cfg.data.table
    text = {c: pa.string() for c in [t.key, t.label, *t.numeric, *t.categorical]}
    table = pa.concat_tables(pacsv.read_csv(storage.path_of(path), convert_options=pacsv.ConvertOptions(
        column_types=text, include_columns=list(text))) for path, _ in files)
    frame = table.to_pandas()
    numbers = frame[list(t.numeric)].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce")).to_numpy(np.float64)
    labels = frame[t.label].str.strip()
    keep = np.isfinite(numbers).all(1) & frame[list(t.categorical)].notna().all(1).to_numpy()
    if t.classes:
        keep &= labels.isin(list(t.classes)).to_numpy()
    numbers, frame, labels = numbers[keep], frame[keep], labels[keep]
    std = numbers.std(0)
    columns = [(numbers - numbers.mean(0)) / np.where(std > 0, std, 1.0)]
    for c in t.categorical:
        values = frame[c].str.strip()
        codes = values.astype("category").cat.codes.to_numpy()  # categories are sorted
        columns.append(np.eye(codes.max() + 1, dtype=np.float32)[codes])
    x = np.ascontiguousarray(np.hstack(columns), np.float32)
    classes = list(t.classes) or sorted(labels.unique())
    offsets = pa.array(np.arange(0, len(x) + 1, dtype=np.int32) * x.shape[1])
    out_table = pa.table({"key": frame[t.key].str.strip().to_numpy(),
                          "label": pa.array(labels.map({n: i for i, n in enumerate(classes)}).to_numpy(np.int32)),
                          "features": pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))})
    pq.write_table(out_table, out)
    return out_table.num_rows


def _tables_decode_only(spark, cfg: Config) -> None:
    from pipelines.sources import read_files
    from pipelines.tables import parse

    parse(read_files(spark, cfg.paths.landing), cfg, cfg.paths.landing, None).write.format("noop").mode("overwrite").save()


def tables_config(cfg: Config, conf: str = "conf/adult.yaml", overrides: tuple[str, ...] = ()) -> Config:
    """The tables case runs on its own config (UCI Adult), whatever --conf the bench got; the
    landing is <repo>/landing/adult unless overridden, landed first (`dlpipe land`) if missing."""
    import os

    from dlpipe import steps
    from dlpipe.config import load_config

    tables = load_config(REPO / conf, [f"paths.landing={REPO}/landing/adult", f"paths.lake={cfg.paths.lake}",
                                       f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", *overrides])
    if not os.path.isdir(storage.path_of(tables.paths.landing)):
        steps.land(tables)
    return tables


PREPARE_CASES = [PrepareCase("images", _dlpipe_prepare, _images_baseline, _images_decode_only),
                 PrepareCase("tables", _dlpipe_prepare, _tables_baseline, _tables_decode_only, tables_config)]


def prepare(spark, cfg: Config, cases: list[PrepareCase] | None = None) -> dict:
    """Each case on the same landed files: dlpipe's Spark pipeline (decode + normalize + Delta
    writes, into a scratch lake) against the single-process baseline, in this one run."""
    from pipelines.sources import list_files

    results, run_cfg = {}, cfg
    for case in cases or PREPARE_CASES:
        cfg = case.config(run_cfg) if case.config is not None else run_cfg
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
        rows = summary["input_rows"] if "input_rows" in summary else summary["accepted"] + summary["rejected"]
        results[case.name] = {
            "landing": cfg.paths.landing, "files": len(files), "megabytes": megabytes,
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
            "cores": spark.sparkContext.defaultParallelism, "cases": results,
            "goal": "speedup >= 1.5 on 2 cores"}


# --- `dlpipe bench models --family feedforward` -------------------------------------------------
# Every figure in one run on the same Delta tables: dlpipe's distributed loop against well-known
# baselines (a plain PyTorch loop given the same wall time, scikit-learn, Spark MLlib).

FASHION_FIRST, FASHION_SECOND = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def _arrays(files: list[str], shape: tuple[int, ...], labels: tuple[int, ...] = (), fraction: float = 1.0):
    from dlpipe.launch import load_shard

    return load_shard(files, shape, 0, 1, labels=labels, fraction=fraction)


def _run(spark, net, fit, train_files, test_files, backend, workers, threads, **extra) -> dict:
    """dlpipe's loop through a launcher; "val" is the test table here, so val_* are test figures."""
    task = TrainTask(net=net, fit=fit, train_files=train_files, val_files=test_files, max_rows=0,
                     tracking_uri="", run_id="", threads=threads, **extra)
    started = time.perf_counter()
    result = launch(spark, task, backend, workers)
    wall = time.perf_counter() - started
    last = result["history"][-1]
    return {"test_accuracy": last["val_accuracy"], "train_wall_s": wall, "epochs": fit.epochs,
            "backend": result["backend"], "world_size": result["world_size"], "state_dict": result["state_dict"],
            "train_rows": result["train_rows"]}


def plain_loop_for(net, seconds: float, batch_size: int, lr: float, train, test, seed: int) -> dict:
    """The baseline: the same net in a plain single-process PyTorch loop (Adam, cross-entropy),
    epochs until `seconds` of wall time are spent, then test accuracy."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    x, y = torch.from_numpy(train[0]), torch.from_numpy(train[1]).long()
    model = build(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    epochs = 0.0
    while time.perf_counter() - started < seconds:
        model.train()
        order = torch.randperm(len(x))
        steps = len(x) // batch_size
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            if time.perf_counter() - started >= seconds:
                epochs += (step + 1) / steps
                break
        else:
            epochs += 1
    return {"test_accuracy": _accuracy(model, test), "train_wall_s": time.perf_counter() - started, "epochs": round(epochs, 2)}


@torch.no_grad()
def _accuracy(model, data) -> float:
    model.eval()
    x, y = torch.from_numpy(data[0]), torch.from_numpy(data[1]).long()
    correct = sum((model(x[i : i + 2048]).argmax(1) == y[i : i + 2048]).sum().item() for i in range(0, len(x), 2048))
    return correct / len(x)


def _sklearn_mlp(hidden: list[int], epochs: int, batch_size: int, lr: float, train, test, seed: int) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=epochs, batch_size=batch_size,
                        learning_rate_init=lr, random_state=seed)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter = the same epoch budget on purpose
        clf.fit(train[0].reshape(len(train[0]), -1), train[1])
    seconds = time.perf_counter() - started
    accuracy = float((clf.predict(test[0].reshape(len(test[0]), -1)) == test[1]).mean())
    return {"test_accuracy": accuracy, "train_wall_s": seconds, "epochs": clf.n_iter_}


def _fashion_tables(cfg: Config) -> dict[str, list[str]]:
    files = {}
    for split in ("train", "test"):
        uri = cfg.table_uri(split)
        version = lake.latest_version(uri)
        if version is None:
            raise FileNotFoundError(f"no Delta table at {uri}: run `dlpipe land-demo-data` and `dlpipe prepare` first")
        files[split] = lake.table_files(uri, version)
        files[f"{split}_table"] = f"{uri}@{version}"
    return files


def _say(line: str) -> None:
    print(f"bench models: {line}", flush=True)


def models(spark, cfg: Config, family: str = "feedforward", adult_conf: str = "conf/adult_mlp.yaml",
           cnn_epochs: int = 6, mlp_epochs: int = 8, pretrain_epochs: int = 2, finetune_epochs: int = 30,
           finetune_fraction: float = 0.01) -> dict:
    if family != "feedforward":
        raise ValueError(f"unknown model family {family!r} (expected feedforward)")
    import dataclasses as dc

    from dlpipe import modeling

    t, threads = cfg.train, max(1, (torch.get_num_threads()))
    backend, workers = t.backend, t.num_workers
    per_worker_threads = max(1, threads // (1 if backend == "local" else workers))
    files = _fashion_tables(cfg)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    summary: dict = {"step": "bench models", "family": family, "tables": {k: v for k, v in files.items() if k.endswith("_table")},
                     "backend": backend, "workers": workers, "threads": threads, "cases": {}}
    test = _arrays(files["test"], shape)
    base_fit = FitConfig(epochs=cnn_epochs, batch_size=t.batch_size, lr=t.lr, lr_schedule="cosine", seed=t.seed)

    # 1. CNN on Fashion-MNIST vs a plain PyTorch loop of the same net given the same wall time
    cnn_cfg = dc.replace(cfg, model=dc.replace(cfg.model, name="cnn", task="classification"))
    net = modeling.image_net(cnn_cfg)
    _say(f"CNN {net.params} on {files['train_table']}, {cnn_epochs} epochs, {backend} x {workers}")
    ours = _run(spark, net, base_fit, files["train"], files["test"], backend, workers, per_worker_threads)
    ours.pop("state_dict")
    torch.set_num_threads(threads)
    train = _arrays(files["train"], shape)
    plain = plain_loop_for(net, ours["train_wall_s"], t.batch_size * (1 if backend == "local" else workers), t.lr,
                           train, test, t.seed)
    summary["cases"]["cnn_fashion_mnist"] = {"dlpipe": ours, "plain_pytorch_same_wall_time": plain,
                                             "goal": "dlpipe test_accuracy >= 0.91"}
    _say(f"CNN: dlpipe {ours['test_accuracy']:.4f} in {ours['train_wall_s']:.0f} s; plain loop {plain['test_accuracy']:.4f} "
         f"({plain['epochs']} epochs in the same time)")

    # 2. MLP on Fashion-MNIST vs scikit-learn's MLPClassifier, same hidden sizes and epochs
    mlp_cfg = dc.replace(cfg, model=dc.replace(cfg.model, name="mlp", task="classification"))
    mlp_net = modeling.image_net(mlp_cfg)
    mlp_fit = dc.replace(base_fit, epochs=mlp_epochs, lr=0.001)
    ours = _run(spark, mlp_net, mlp_fit, files["train"], files["test"], backend, workers, per_worker_threads)
    ours.pop("state_dict")
    sk = _sklearn_mlp(cfg.model.mlp.hidden, mlp_epochs, t.batch_size, 0.001, train, test, t.seed)
    summary["cases"]["mlp_fashion_mnist"] = {"dlpipe": ours, "sklearn_MLPClassifier": sk, "hidden": cfg.model.mlp.hidden,
                                             "goal": "dlpipe test_accuracy >= sklearn's"}
    _say(f"MLP: dlpipe {ours['test_accuracy']:.4f} in {ours['train_wall_s']:.0f} s; scikit-learn {sk['test_accuracy']:.4f} "
         f"in {sk['train_wall_s']:.0f} s")
    del train

    # 3. MLP on UCI Adult vs Spark MLlib (the table pipeline's Adult tables)
    summary["cases"]["mlp_adult"] = adult_case(spark, cfg, adult_conf, backend, workers, per_worker_threads)

    # 4. Fine-tuning: pretrained on five classes, 1% of the labels of the other five
    summary["cases"]["finetune_fashion_mnist"] = finetune_case(
        spark, net, base_fit, files, backend, workers, per_worker_threads, pretrain_epochs, finetune_epochs, finetune_fraction)
    return summary


def finetune_case(spark, net, fit, files, backend, workers, threads, pretrain_epochs, finetune_epochs,
                  fraction: float = 0.01) -> dict:
    """CNN trained on classes 0-4; its features, with a new head, fine-tuned on 1% of the training
    labels of classes 5-9, against the same CNN trained from scratch on that 1%."""
    import dataclasses as dc

    first = dc.replace(net, num_outputs=len(FASHION_FIRST))
    second = dc.replace(net, num_outputs=len(FASHION_SECOND))
    pre = _run(spark, first, dc.replace(fit, epochs=pretrain_epochs), files["train"], files["test"], backend, workers,
               threads, labels=FASHION_FIRST)
    state = {k: v for k, v in pre.pop("state_dict").items() if not k.startswith("head.")}
    small = dc.replace(fit, epochs=finetune_epochs, batch_size=16, lr_schedule="cosine")
    runs = {}
    for name, extra in (("from_scratch", {}), ("fine_tuned", {"init_state": state}),
                        ("fine_tuned_frozen_features", {"init_state": state, "fit": dc.replace(small, freeze="features")})):
        run_fit = extra.pop("fit", small)
        runs[name] = _run(spark, second, run_fit, files["train"], files["test"], "local", 1, threads * workers,
                          labels=FASHION_SECOND, label_fraction=fraction, **extra)
        runs[name].pop("state_dict")
        _say(f"fine-tuning, {name}: test accuracy {runs[name]['test_accuracy']:.4f} on classes 5-9 "
             f"({runs[name]['train_rows']} labelled rows)")
    return {"pretrained_on_classes_0_4": pre, "label_fraction": fraction, **runs,
            "goal": "fine_tuned test_accuracy > from_scratch"}


def adult_case(spark, cfg: Config, conf: str, backend: str, workers: int, threads: int) -> dict:
    import os

    from dlpipe.config import load_config

    if not os.path.isfile(conf):
        return {"status": f"not wired: {conf} is missing (the table pipeline of issue #4 has not landed on this branch)"}
    adult = load_config(conf, [f"paths.lake={cfg.paths.lake}", f"spark.master={cfg.spark.master}"])
    tables = {}
    for split in ("train", "test"):
        uri = adult.table_uri(split)
        version = lake.latest_version(uri)
        if version is None:
            return {"status": f"not wired: no Delta table at {uri} (run `dlpipe prepare --conf {conf}` first)"}
        tables[split] = (uri, version)
    return _adult(spark, adult, tables, backend, workers, threads)


def _adult(spark, cfg: Config, tables: dict, backend: str, workers: int, threads: int) -> dict:
    from pyspark.ml.classification import LogisticRegression, MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from dlpipe import modeling

    train_files = lake.table_files(*tables["train"])
    test_files = lake.table_files(*tables["test"])
    column, shape = modeling.input_of(spark, *tables["test"], cfg)
    net = modeling.net_for(cfg, column, shape, 2)
    t = cfg.train
    fit = FitConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, lr_schedule=t.lr_schedule, seed=t.seed)
    ours = _run(spark, net, fit, train_files, test_files, backend, workers, threads)
    model = build(net)
    model.load_state_dict(ours.pop("state_dict"))
    x, y = _arrays(test_files, shape)
    with torch.no_grad():
        p = torch.softmax(model.eval()(torch.from_numpy(x)), 1)[:, 1].numpy()
    ours["roc_auc"] = binary_auc(y, p)
    ours["test_accuracy"] = float(((p >= 0.5) == (y == 1)).mean())
    result = {"table_train": "%s@%s" % tables["train"], "table_test": "%s@%s" % tables["test"], "features": shape[0],
              "dlpipe_mlp": ours, "hidden": net.params.hidden}
    train_df = lake.read_table(spark, *tables["train"]).select(F.col("label").cast("double"), array_to_vector("features").alias("features")).cache()
    test_df = lake.read_table(spark, *tables["test"]).select(F.col("label").cast("double"), array_to_vector("features").alias("features")).cache()
    train_df.count(), test_df.count()
    auc = BinaryClassificationEvaluator(rawPredictionCol="probability", labelCol="label", metricName="areaUnderROC")
    for name, estimator in (
        ("spark_MultilayerPerceptronClassifier", MultilayerPerceptronClassifier(
            layers=[shape[0], *net.params.hidden, 2], maxIter=200, seed=t.seed)),
        ("spark_LogisticRegression", LogisticRegression(maxIter=100)),
    ):
        started = time.perf_counter()
        fitted = estimator.fit(train_df)
        seconds = time.perf_counter() - started
        pred = fitted.transform(test_df)
        accuracy = pred.agg(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0]
        result[name] = {"test_accuracy": float(accuracy), "roc_auc": float(auc.evaluate(pred)), "train_wall_s": seconds}
        _say(f"Adult {name}: accuracy {accuracy:.4f}, ROC AUC {result[name]['roc_auc']:.4f}, {seconds:.0f} s")
    _say(f"Adult dlpipe MLP: accuracy {ours['test_accuracy']:.4f}, ROC AUC {ours['roc_auc']:.4f}, {ours['train_wall_s']:.0f} s")
    train_df.unpersist(), test_df.unpersist()
    return result

