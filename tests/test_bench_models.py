"""`dlpipe bench models --family feedforward` runs end to end on a small slice and reports every
case (the figures are for the README table, not asserted)."""

import pytest

from dlpipe import bench

pytestmark = pytest.mark.slow


def test_bench_models_reports_every_case(spark, prepared_small):
    cfg, _ = prepared_small
    summary = bench.models(spark, cfg, "feedforward", adult_conf="conf/no_such_file.yaml", cnn_epochs=1, mlp_epochs=1,
                           pretrain_epochs=1, finetune_epochs=2, finetune_fraction=0.5)
    cases = summary["cases"]
    for name in ("cnn_fashion_mnist", "mlp_fashion_mnist"):
        for run in cases[name].values():
            if isinstance(run, dict):
                assert 0 <= run["test_accuracy"] <= 1 and run["train_wall_s"] > 0, name
    assert cases["cnn_fashion_mnist"]["plain_pytorch_same_wall_time"]["epochs"] > 0
    assert cases["mlp_adult"]["status"].startswith("not wired")
    tune = cases["finetune_fashion_mnist"]
    assert {"from_scratch", "fine_tuned", "fine_tuned_frozen_features"} <= set(tune)
    assert tune["fine_tuned"]["train_rows"] == tune["from_scratch"]["train_rows"] > 0
