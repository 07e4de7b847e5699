"""`dlpipe bench models --family recurrent` at a tiny size on real packaged data: the forecast case on
sunspots landed and prepared here (1 epoch), and the long-range task at T = 10 on a few rows. Every
key the docs name comes back and the baselines are computed on the same windows (the figures are for
docs/performance.md, not asserted)."""

import numpy as np
import pytest

from benchmarks import long_range, recurrent
from tests.conftest import make_config, stage

pytestmark = pytest.mark.slow


def test_forecast_case_reports_dlpipe_and_both_baselines_on_the_same_test_windows(spark, tmp_path):
    cfg = make_config(tmp_path, f"paths.landing={tmp_path}/landing/sunspots", "train.backend=local",
                      conf="conf/sunspots.yaml")
    stage("land", spark, cfg)
    prepared = stage("prepare", spark, cfg)

    case = recurrent.run(spark, cfg, cases=("forecast_sunspots",), epochs=1)["cases"]["forecast_sunspots"]

    assert case["test_windows"] == prepared["windows"]["test"] > 0 and case["season"] == 11
    for key in ("dlpipe_mae", "naive_mae", "arima_mae"):
        assert np.isfinite(case[key]) and case[key] > 0, key
    assert case["arima_model"].startswith(("ARIMA(", "ETS(")) and case["dlpipe_samples_per_sec"] > 0


def test_long_range_case_reports_every_cell_and_the_clipping_runs():
    case, figure = long_range.run(steps=10, rows=64, epochs=1, hidden=8, log=lambda _: None)

    assert {"rnn_mse", "lstm_mse", "gru_mse"} <= set(case) and case["steps"] == 10
    assert set(case["rnn_lr_0.01_mse"]) == {"no clipping", "clip 1.0"}
    assert len(figure.axes) >= 2
