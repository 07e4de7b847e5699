"""The prepare benchmark runs at two small scales and reports every figure over the same files
on both sides (the figures themselves are for docs/performance.md, not asserted)."""

import dataclasses
import functools

import pytest

from benchmarks import prepare as bench
from dlpipe import lake

pytestmark = pytest.mark.slow


def test_bench_prepare_reports_each_scale_the_fixed_cost_and_the_loader(spark, small_landing):
    cfg, landed = small_landing
    before = {s: lake.latest_version(cfg.table_uri(s)) for s in ("train", "rejected")}
    images = next(c for c in bench.PREPARE_CASES if c.name == "images")
    summary = bench.run(spark, cfg, [images], repeats=1, scales={"images": (1, 2)})
    files = landed["files_written"] + landed["files_already_there"]
    runs = summary["cases"]["images"]["runs"]
    assert [(r["scale"], r["files"]) for r in runs] == [(1, files), (2, 2 * files)]
    for r in runs:
        assert r["baseline_rows"] == r["accepted"] == r["rows"] == r["files"]  # the same input on both sides
        assert r["speedup"] == pytest.approx(r["baseline_s"] / r["dlpipe_s"], abs=6e-4)  # rounded to 3 places
    assert summary["fixed_cost_s"]["append_nothing_new_s"] > 0 and summary["fixed_cost_s"]["one_file_s"] > 0
    loader = summary["loader"]
    assert 0 < loader["rows"] < files and loader["ratio"] == pytest.approx(
        loader["dlpipe_rows_per_s"] / loader["raw_pyarrow_rows_per_s"], rel=0.05, abs=1e-3)
    assert summary["cores"] >= 1 and summary["load_average_before"] >= 0
    # it wrote into a scratch lake, never into the configured one
    assert {s: lake.latest_version(cfg.table_uri(s)) for s in ("train", "rejected")} == before


def test_bench_prepare_tables_case_grows_the_rows_under_new_keys(spark, small_landing):
    cfg, _ = small_landing
    tables = dataclasses.replace(next(c for c in bench.PREPARE_CASES if c.name == "tables"),
                                 landing=functools.partial(bench._tables_landing, rows=300, shards=2))
    runs = bench.run(spark, cfg, [tables], repeats=1, scales={"tables": (1, 3)})["cases"]["tables"]["runs"]
    assert [(r["scale"], r["files"], r["rows"]) for r in runs] == [(1, 2, 300), (3, 6, 900)]
    assert all(r["baseline_rows"] == r["accepted"] == r["rows"] for r in runs)
