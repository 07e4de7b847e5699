"""`dlpipe bench prepare`: `dlpipe prepare` on Spark against a plain single-process script doing the
same decode/parse, normalization, split and Parquet write over the same files, at growing scale:
images at 1x, 4x and 16x of the landed Fashion-MNIST files (hard links under new names: same
bytes, new keys), tables at 1x, 16x and 64x of UCI Adult's rows. Page cache warmed, each side run
`repeats` times and its best kept. Also the fixed cost of prepare (append with nothing new; one
file) and the Delta -> tensor loader of training against a raw pyarrow read of the same files."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlpipe import storage, tensors
from dlpipe.config import Config

REPO = Path(__file__).resolve().parents[1]
SPLIT = (0.8, 0.1)  # the baseline's train / val fractions of a crc32 bucket, as dlpipe's split fractions


@dataclasses.dataclass(frozen=True)
class PrepareCase:
    """One prepare pipeline: `landing(cfg, scale, work)` makes the input at that scale and
    returns its config; `baseline(cfg, out)` lists the landing zone itself, as dlpipe does, does
    the same work in one plain process and returns the rows it wrote."""

    name: str
    scales: tuple[int, ...]
    landing: Callable[[Config, int, Path], Config]
    baseline: Callable[[Config, str], int]


def _split_of(key: str) -> str:
    bucket = zlib.crc32(key.encode()) % 10_000
    return "train" if bucket < SPLIT[0] * 10_000 else "val" if bucket < (SPLIT[0] + SPLIT[1]) * 10_000 else "test"


def _write_splits(out: str, keys: list[str], columns: dict[str, pa.Array]) -> None:
    table = pa.table({"key": keys, **columns})
    split = pa.array([_split_of(k) for k in keys])
    os.makedirs(out, exist_ok=True)
    for name in ("train", "val", "test"):
        pq.write_table(table.filter(pa.compute.equal(split, name)), f"{out}/{name}.parquet")


def _walk(landing: str) -> list[str]:
    """The baseline lists its own input, as dlpipe does, the fastest plain way: os.walk, names
    only (no stat), the same files (names starting with . or _ left out), in no particular order."""
    found = []
    for folder, dirs, names in os.walk(storage.path_of(landing)):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        found += [os.path.join(folder, n) for n in names if not n.startswith((".", "_"))]
    return found


def _images_baseline(cfg: Config, out: str) -> int:
    """PIL + numpy + pyarrow, single process: list, decode, resize, channels-first bytes (stored as
    dlpipe stores them, dlpipe.tensors), split by a hash of the key, one Parquet file per split."""
    from PIL import Image

    size, channels, label_of = cfg.data.image_size, cfg.data.channels, {c: i for i, c in enumerate(cfg.data.classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    root = cfg.paths.landing.rstrip("/")
    keys, labels, pixels = [], [], []
    for path in _walk(cfg.paths.landing):
        key = path.split(root.split("://", 1)[-1] + "/", 1)[-1]
        folder = key.split("/")[0]
        if folder not in label_of:
            continue
        with open(storage.path_of(path), "rb") as f, Image.open(io.BytesIO(f.read())) as image:
            array = np.asarray(image.convert(mode).resize((size, size)), dtype=np.uint8)
        keys.append(key)
        labels.append(label_of[folder])
        pixels.append(array.reshape(size, size, channels).transpose(2, 0, 1).ravel())
    flat = np.stack(pixels) if pixels else np.zeros((0, size * size * channels), np.uint8)
    _write_splits(out, keys, {"label": pa.array(labels, pa.int32()), "pixels": tensors.pack("pixels", flat)})
    return len(keys)


def _images_landing(cfg: Config, scale: int, work: Path) -> Config:
    """The landed images, or `scale` hard-linked copies of each under new names."""
    if scale == 1:
        return cfg
    src, dst = Path(storage.path_of(cfg.paths.landing)), work / f"images_x{scale}"
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.name.startswith((".", "_")):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            for copy in range(scale):
                os.link(path, target.with_name(f"c{copy}_{path.name}"))
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, landing=str(dst)))


def _tables_baseline(cfg: Config, out: str) -> int:
    """pyarrow CSV + numpy, single process: list, parse, drop rows with a missing or non-numeric value
    or an unknown label, standardize the numeric columns (population std, fitted on the train
    split) and one-hot the categorical ones (sorted vocabularies of the train split), numeric
    first: dlpipe's feature layout; split by a hash of the key, one Parquet file per split."""
    import pandas as pd
    import pyarrow.csv as pacsv

    t = cfg.data.table
    text = {c: pa.string() for c in [t.key, t.label, *t.numeric, *t.categorical]}
    table = pa.concat_tables(pacsv.read_csv(storage.path_of(path), convert_options=pacsv.ConvertOptions(
        column_types=text, include_columns=list(text))) for path in _walk(cfg.paths.landing))
    frame = table.to_pandas()
    numbers = frame[list(t.numeric)].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce")).to_numpy(np.float64)
    labels = frame[t.label].str.strip()
    keep = np.isfinite(numbers).all(1) & frame[list(t.categorical)].notna().all(1).to_numpy()
    if t.classes:
        keep &= labels.isin(list(t.classes)).to_numpy()
    numbers, frame, labels = numbers[keep], frame[keep], labels[keep]
    keys = frame[t.key].str.strip().tolist()
    train = np.array([_split_of(k) == "train" for k in keys])
    std = numbers[train].std(0)
    columns = [(numbers - numbers[train].mean(0)) / np.where(std > 0, std, 1.0)]
    for c in t.categorical:
        values = frame[c].str.strip()
        vocabulary = sorted(values[train].unique())
        codes = pd.Categorical(values, categories=vocabulary).codes
        onehot = np.zeros((len(values), len(vocabulary)), np.float32)
        onehot[np.arange(len(values))[codes >= 0], codes[codes >= 0]] = 1.0
        columns.append(onehot)
    x = np.ascontiguousarray(np.hstack(columns), np.float32)
    classes = list(t.classes) or sorted(labels.unique())
    _write_splits(out, keys, {"label": pa.array(labels.map({n: i for i, n in enumerate(classes)}).to_numpy(np.int32)),
                              "features": tensors.pack("features", x)})  # float32 bytes, as dlpipe stores them
    return len(x)


def _tables_landing(cfg: Config, scale: int, work: Path, rows: int | None = None, shards: int = 8) -> Config:
    """UCI Adult as CSV shards, `scale` copies of its rows under new ids; the case's own config."""
    import pandas as pd

    from dlpipe import datasets
    from dlpipe.config import load_config

    landing = work / f"tables_x{scale}"
    landing.mkdir(parents=True)
    adult = datasets.adult().iloc[:rows]
    copies = [adult.assign(id=adult["id"] + c * len(adult)) for c in range(scale)]
    datasets.write_shards(pd.concat(copies, ignore_index=True), landing, shards * scale, "csv")
    return load_config(REPO / "conf/adult.yaml", [f"paths.landing={landing}", f"paths.lake={cfg.paths.lake}",
                                     f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"])


PREPARE_CASES = [PrepareCase("images", (1, 4, 16), _images_landing, _images_baseline),
                 PrepareCase("tables", (1, 16, 64), _tables_landing, _tables_baseline)]


def _best(runs: int, work: Callable[[], Any]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        out = work()
        best = min(best, time.perf_counter() - started)
    return best, out


def _prepare(spark, cfg: Config, lake: str, mode: str = "overwrite") -> dict:
    from dlpipe.stages import prepare

    if mode == "overwrite":
        shutil.rmtree(lake, ignore_errors=True)
    return prepare.run(spark, dataclasses.replace(cfg.data, mode=mode), dataclasses.replace(cfg.paths, lake=lake))


def run(spark, cfg: Config, cases: list[PrepareCase] | None = None, repeats: int = 2,
        scales: dict[str, tuple[int, ...]] | None = None) -> dict:
    from pipelines.sources import list_files

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="dlpipe-bench-prepare-"))
    out: dict[str, Any] = {"step": "bench prepare", "spark_master": spark.sparkContext.master,
                           "cores": os.cpu_count(), "load_average_before": load_before, "repeats": repeats, "cases": {}}
    try:
        for case in cases or PREPARE_CASES:
            runs = []
            for scale in (scales or {}).get(case.name, case.scales):
                case_cfg = case.landing(cfg, scale, work)
                files = list_files(case_cfg.paths.landing)
                for path, _ in files:  # warm the page cache: neither side pays for the first disk read
                    with open(storage.path_of(path), "rb") as f:
                        f.read()
                print(f"bench prepare {case.name} x{scale}: {len(files)} files, baseline (1 process)", flush=True)
                base_s, base_rows = _best(repeats, lambda: case.baseline(case_cfg, str(work / "baseline")))
                print(f"bench prepare {case.name} x{scale}: dlpipe on {spark.sparkContext.master}", flush=True)
                spark_s, summary = _best(repeats, lambda: _prepare(spark, case_cfg, str(work / "lake")))
                base_s, spark_s = round(base_s, 3), round(spark_s, 3)  # the ratio is of the figures shown
                runs.append({"scale": scale, "files": len(files), "rows": summary["input_rows"],
                             "accepted": summary["accepted"], "baseline_rows": base_rows, "baseline_s": base_s,
                             "dlpipe_s": spark_s, "speedup": round(base_s / spark_s, 3)})
                print(f"bench prepare {case.name} x{scale}: baseline {base_s:.1f} s, dlpipe {spark_s:.1f} s: "
                      f"{base_s / spark_s:.2f}x (goal >= 1.5 at the largest scale)", flush=True)
                if case.name == "images" and scale == 1:
                    out["fixed_cost_s"] = _fixed_cost(spark, case_cfg, work)
                    out["loader"] = _loader(case_cfg, summary["tables"]["train"], repeats)
                shutil.rmtree(work / "lake", ignore_errors=True)
                if case_cfg.paths.landing != cfg.paths.landing:
                    shutil.rmtree(storage.path_of(case_cfg.paths.landing), ignore_errors=True)
            out["cases"][case.name] = {"runs": runs}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["load_average_after"] = os.getloadavg()[0]
    return out


def _fixed_cost(spark, cfg: Config, work: Path) -> dict:
    """Wall time of prepare with nothing new to take (append after a full run) and of one file."""
    nothing, _ = _best(1, lambda: _prepare(spark, cfg, str(work / "lake"), "append"))
    one = work / "one" / cfg.data.classes[0]
    one.mkdir(parents=True)
    source = next(p for p in sorted(Path(storage.path_of(cfg.paths.landing), cfg.data.classes[0]).iterdir()))
    shutil.copyfile(source, one / source.name)
    one_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, landing=str(work / "one")))
    single, _ = _best(1, lambda: _prepare(spark, one_cfg, str(work / "lake-one")))
    return {"append_nothing_new_s": round(nothing, 3), "one_file_s": round(single, 3)}


def _loader(cfg: Config, train: dict, repeats: int) -> dict:
    """The training loader (dlpipe.worker.load_shard) against pyarrow.parquet reading the same
    snapshot files into the same float32 / int64 arrays."""
    from dlpipe import lake
    from dlpipe.worker import load_shard

    files = lake.table_files(train["uri"], train["version"])
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)

    def raw():
        table = pq.read_table([storage.path_of(f) for f in files], columns=["label", "pixels"])
        pixels = table.column("pixels").combine_chunks()  # one byte per value, rows back to back
        x = np.frombuffer(pixels.buffers()[2], np.uint8)[: table.num_rows * int(np.prod(shape))]
        x = (x.astype(np.float32) / np.float32(255)).reshape(table.num_rows, *shape)
        return x, table.column("label").to_numpy().astype(np.int64)

    raw_s, (x, _) = _best(repeats, raw)
    ours_s, (x2, _) = _best(repeats, lambda: load_shard(files, shape, 0, 1))
    assert x.shape == x2.shape
    rows = len(x)
    return {"rows": rows, "raw_pyarrow_rows_per_s": round(rows / raw_s), "dlpipe_rows_per_s": round(rows / ours_s),
            "ratio": round(raw_s / ours_s, 3)}


def plot(summary: dict, out: str) -> None:
    """Wall time against scale for each case, dlpipe and the baseline (docs/performance.md):
    `python -m benchmarks.prepare bench-prepare.json docs/images/prepare_scaling.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = summary["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.6))
    for ax, (name, case) in zip(np.atleast_1d(axes), cases.items()):
        rows = [r["rows"] for r in case["runs"]]
        ax.plot(rows, [r["baseline_s"] for r in case["runs"]], "o-", label="1 process (pyarrow/PIL)")
        ax.plot(rows, [r["dlpipe_s"] for r in case["runs"]], "s-", label=f"dlpipe prepare, Spark on {summary['cores']} cores")
        for r in case["runs"]:
            ax.annotate(f"{r['speedup']:.2f}x", (r["rows"], r["dlpipe_s"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="rows", ylabel="wall time, s (best of runs)", title=name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    import json
    import sys

    plot(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
