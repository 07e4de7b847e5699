"""The prepare benchmark runs on a small slice and reports both runs over the same files (the
figures themselves are for the README, not asserted)."""

import pytest

from dlpipe import bench, lake

pytestmark = pytest.mark.slow


def test_bench_prepare_measures_dlpipe_and_the_baseline_on_the_same_files(spark, small_landing):
    cfg, landed = small_landing
    before = {s: lake.latest_version(cfg.table_uri(s)) for s in ("train", "rejected")}
    summary = bench.prepare(spark, cfg)
    images = summary["cases"]["images"]
    files = landed["files_written"] + landed["files_already_there"]
    assert images["files"] == files
    assert images["baseline_1_process"]["rows"] == images["dlpipe_spark"]["accepted"] == files
    for run in ("baseline_1_process", "dlpipe_spark"):
        assert images[run]["rows_per_sec"] > 0 and images[run]["mb_per_sec"] > 0
    assert images["speedup"] == pytest.approx(images["baseline_1_process"]["seconds"] / images["dlpipe_spark"]["seconds"])
    # it wrote into a scratch lake, never into the configured one
    assert {s: lake.latest_version(cfg.table_uri(s)) for s in ("train", "rejected")} == before
