"""The prepare benchmark runs on a small slice and reports both runs over the same files (the
figures themselves are for the README, not asserted)."""

import dataclasses

import pytest

from benchmarks import prepare as bench
from dlpipe import lake

pytestmark = pytest.mark.slow


def test_bench_prepare_measures_dlpipe_and_the_baseline_on_the_same_files(spark, small_landing):
    cfg, landed = small_landing
    before = {s: lake.latest_version(cfg.table_uri(s)) for s in ("train", "rejected")}
    summary = bench.run(spark, cfg)
    images = summary["cases"]["images"]
    files = landed["files_written"] + landed["files_already_there"]
    assert images["files"] == files
    assert images["baseline_1_process"]["rows"] == images["dlpipe_spark"]["accepted"] == files
    for run in ("baseline_1_process", "dlpipe_spark"):
        assert images[run]["rows_per_sec"] > 0 and images[run]["mb_per_sec"] > 0
    assert images["speedup"] == pytest.approx(images["baseline_1_process"]["seconds"] / images["dlpipe_spark"]["seconds"])
    # it wrote into a scratch lake, never into the configured one
    assert {s: lake.latest_version(cfg.table_uri(s)) for s in ("train", "rejected")} == before


def test_bench_prepare_tables_case_runs_on_its_own_adult_config(spark, small_landing, tmp_path):
    from dlpipe import datasets

    cfg, _ = small_landing  # the images run's config: the tables case must not use its landing
    (tmp_path / "adult").mkdir()
    datasets.write_shards(datasets.adult().iloc[:300], tmp_path / "adult", 2, "csv")
    tables = next(c for c in bench.PREPARE_CASES if c.name == "tables")
    case = dataclasses.replace(tables, config=lambda c: bench.tables_config(c, overrides=(f"paths.landing={tmp_path}/adult",)))
    result = bench.run(spark, cfg, [case])["cases"]["tables"]
    assert result["landing"] == f"{tmp_path}/adult" and result["files"] == 2
    assert result["baseline_1_process"]["rows"] == result["dlpipe_spark"]["rows"] == result["dlpipe_spark"]["accepted"] == 300
    assert result["speedup"] == pytest.approx(result["baseline_1_process"]["seconds"] / result["dlpipe_spark"]["seconds"])
