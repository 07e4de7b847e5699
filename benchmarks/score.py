"""`dlpipe bench score`: rows/s of the score job's path against a plain in-process PyTorch loop
and against mlflow.pyfunc.spark_udf, on the same rows, in one run (see run())."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from pyspark.sql import functions as F

from benchmarks.common import arrays, say
from dlpipe import lake, tracking
from dlpipe.config import Config
from dlpipe.errors import InputNotFound
from dlpipe.scoring import predict


def run(spark, cfg: Config) -> dict:
    """`dlpipe bench score`: rows/s of the score job's path (predict with the model shipped once
    per executor process, whole Arrow batches, Delta write) against (a) a plain in-process
    PyTorch loop over the same rows and (b) mlflow.pyfunc.spark_udf with default settings, which
    also writes the same Delta output. All on the pinned train table (the most rows), one run,
    after an untimed warm-up that starts every Spark Python worker; the Spark paths alternate
    twice and each keeps its faster run."""
    tracking.setup(cfg.mlflow)
    model_uri = cfg.score.model_uri or f"models:/{cfg.registry.model_name}@champion"
    uri = cfg.table_uri("train")
    version = lake.latest_version(uri)
    if version is None:
        raise InputNotFound(f"no Delta table at {uri}: run `dlpipe prepare` first")
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tempfile.mkdtemp(prefix="dlpipe-bench-"))
    out = Path(tempfile.mkdtemp(prefix="dlpipe-bench-out-"))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.score.batch_size))
    runs = {}

    # (a) plain PyTorch: read the same parquet files, run the exported program batch by batch
    started = time.perf_counter()
    meta = json.loads(Path(local, "artifacts", "meta.json").read_text())
    module = torch.export.load(str(Path(local, "artifacts", "model.pt2"))).module()
    x = torch.from_numpy(arrays(lake.table_files(uri, version), tuple(meta["input_shape"]))[0])
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
    for r in runs.values():
        r["rows_per_sec"] = r["rows"] / r["seconds"]
    ours = runs["dlpipe_score"]["rows_per_sec"]
    summary = {
        "step": "bench score", "model_uri": model_uri, "table": {"uri": uri, "version": version},
        "batch_size": cfg.score.batch_size, "spark_master": spark.sparkContext.master,
        "torch_threads_in_process": torch.get_num_threads(), "runs": runs,
        "ratios": {"score_over_plain_pytorch": ours / runs["a_plain_pytorch_in_process"]["rows_per_sec"],
                   "score_over_spark_udf": ours / runs["b_mlflow_spark_udf"]["rows_per_sec"]},
        "goals": {"score_over_plain_pytorch": ">= 0.8", "score_over_spark_udf": "> 1.0"},
    }
    for name, r in runs.items():
        say(f"{name}: {r['rows_per_sec']:.0f} rows/s ({r['rows']} rows in {r['seconds']:.1f} s)")
    for name, ratio in summary["ratios"].items():
        say(f"{name} = {ratio:.2f} (goal {summary['goals'][name]})")
    return summary
