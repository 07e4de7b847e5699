"""`dlpipe bench prepare`: rows/s and MB/s of each prepare pipeline on Spark against a plain
single-process script doing the same decode and normalize over the same landed files."""

from __future__ import annotations

import dataclasses
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlpipe import storage
from dlpipe.config import Config

REPO = Path(__file__).resolve().parents[1]


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
    from dlpipe.stages import prepare

    return prepare.run(spark, cfg.data, cfg.paths)


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

    parse(read_files(spark, cfg.paths.landing), cfg.data, cfg.paths.landing, None).write.format("noop").mode("overwrite").save()


def tables_config(cfg: Config, conf: str = "conf/adult.yaml", overrides: tuple[str, ...] = ()) -> Config:
    """The tables case runs on its own config (UCI Adult), whatever --conf the bench got; the
    landing is <repo>/landing/adult unless overridden, landed first (`dlpipe land`) if missing."""
    import os

    from dlpipe.config import load_config
    from dlpipe.stages import land

    tables = load_config(REPO / conf, [f"paths.landing={REPO}/landing/adult", f"paths.lake={cfg.paths.lake}",
                                       f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", *overrides])
    if not os.path.isdir(storage.path_of(tables.paths.landing)):
        land.run(tables.data, tables.paths)
    return tables


PREPARE_CASES = [PrepareCase("images", _dlpipe_prepare, _images_baseline, _images_decode_only),
                 PrepareCase("tables", _dlpipe_prepare, _tables_baseline, _tables_decode_only, tables_config)]


def run(spark, cfg: Config, cases: list[PrepareCase] | None = None) -> dict:
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

