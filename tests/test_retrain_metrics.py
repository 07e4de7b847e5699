"""retrain measures the champion exactly as evaluate measured the challenger (issue 12, defect 1):
the same relabelled rows under data.select_classes, every registry.metric of the model's task,
and a regression model's first promotion. Real Spark, Delta and MLflow (SQLite store)."""

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from dlpipe import lake
from tests.conftest import make_config, stage

pytestmark = pytest.mark.slow


def _champion(cfg):
    return MlflowClient(cfg.mlflow.tracking_uri).get_model_version_by_alias(cfg.registry.model_name, "champion")


def test_champion_is_scored_on_the_same_relabelled_holdout(spark, small_landing, tmp_path):
    landing_cfg, _ = small_landing
    classes = landing_cfg.data.classes
    cfg = make_config(
        tmp_path, f"paths.landing={landing_cfg.paths.landing}", f"data.name={landing_cfg.data.name}",
        f"data.classes={json.dumps(classes)}", f"data.select_classes={json.dumps(classes[:2])}",
        "train.backend=local", "train.epochs=3", "train.batch_size=8", "train.checkpoint_every=0",
        "model.cnn.blocks=[{channels: 4}]", "model.cnn.hidden=[16]", "registry.model_name=two_classes",
        "registry.min_accuracy=0.0", "registry.metric=test_accuracy")
    stage("prepare", spark, cfg)
    assert stage("retrain", spark, cfg)["action"] == "promoted"
    champion = _champion(cfg)
    stage("prepare", spark, cfg)  # the same files again: new table versions holding the same rows
    second = stage("retrain", spark, cfg)
    on_holdout = second["champion_metrics_on_holdout"]
    for metric in ("test_accuracy", "test_log_loss"):
        assert on_holdout[metric] == pytest.approx(float(champion.tags[f"dlpipe.metric.{metric}"]), abs=1e-6), metric
    assert on_holdout["test_rows"] == second["challenger_metrics"].get("test_rows", on_holdout["test_rows"])


def test_regression_model_is_promoted_and_compared_on_r2(spark, tmp_path):
    from sklearn.datasets import load_diabetes

    from pipelines.split import hash_split

    cfg = make_config(tmp_path, "data.name=diabetes", "model.name=mlp", "model.task=regression",
                      "model.mlp.hidden=[32, 16]", "model.mlp.dropout=0.0", "train.backend=local", "train.epochs=30",
                      "train.batch_size=32", "train.lr=0.01", "train.checkpoint_every=0",
                      "registry.model_name=diabetes_r2", "registry.metric=test_r2")
    x, y = load_diabetes(return_X_y=True)
    pdf = pd.DataFrame({"key": [f"patient_{i:03d}" for i in range(len(y))], "source": "sklearn.datasets.load_diabetes",
                        "label": (y / 100.0).astype(float), "features": [row.astype(np.float32).tolist() for row in x]})
    df = hash_split(spark.createDataFrame(pdf, "key string, source string, label double, features array<float>"),
                    {"train": 0.7, "val": 0.15, "test": 0.15}).cache()

    def write_tables():
        for split in ("train", "val", "test"):
            lake.write_table(df.where(df.split == split).drop("split"), cfg.table_uri(split))

    write_tables()
    first = stage("retrain", spark, cfg)  # no champion yet: promoted when R^2 > 0
    assert first["action"] == "promoted", first["reason"]
    assert "R^2" in first["reason"]
    champion = _champion(cfg)
    write_tables()  # new versions, the same rows
    second = stage("retrain", spark, cfg)
    reference = float(champion.tags["dlpipe.metric.test_r2"])
    assert second["champion_metrics_on_holdout"]["test_r2"] == pytest.approx(reference, abs=1e-6)
    assert set(second["challenger_metrics"]) >= {"test_r2", "test_mse", "test_mae"}
    # the same seed on the same rows: the challenger is no better, so it is not promoted
    assert second["action"] == "not promoted" and "test_r2" in second["reason"]
