"""`dlpipe bench models --family feedforward` runs end to end on a small slice and reports every
case (the figures are for the README table, not asserted)."""

import pytest

from benchmarks import models as bench

pytestmark = pytest.mark.slow


def test_bench_models_reports_every_case(spark, prepared_small):
    cfg, _ = prepared_small
    summary = bench.run(spark, cfg, "feedforward", adult_conf="conf/no_such_file.yaml", cnn_epochs=1, mlp_epochs=1,
                           pretrain_epochs=1, finetune_epochs=2, finetune_fraction=0.5)
    cases = summary["cases"]
    for name in ("cnn_fashion_mnist", "mlp_fashion_mnist"):
        for run in cases[name].values():
            if isinstance(run, dict):
                assert 0 <= run["test_accuracy"] <= 1 and run["train_wall_s"] > 0, name
    # the baseline runs the same net, epochs, schedule and thread budget; the layout is the one difference
    cnn = cases["cnn_fashion_mnist"]
    plain, ours = cnn["plain_pytorch_same_schedule"], cnn["dlpipe"]
    assert plain["epochs"] == ours["epochs"] == 1 and plain["lr_schedule"] == ours["lr_schedule"] == "cosine"
    assert plain["final_lr"] == pytest.approx(0.0, abs=1e-9)  # annealed to 0 over all steps, like dlpipe's
    assert plain["torch_threads"] == ours["torch_threads_per_worker"] * ours["world_size"]
    assert plain["batch_size"] == cfg.train.batch_size * ours["world_size"]
    assert cnn["differs_by"].startswith("layout only")
    assert cases["mlp_adult"]["status"].startswith("not wired")
    tune = cases["finetune_fashion_mnist"]
    assert {"from_scratch", "fine_tuned", "fine_tuned_frozen_features"} <= set(tune)
    assert tune["fine_tuned"]["train_rows"] == tune["from_scratch"]["train_rows"] > 0
