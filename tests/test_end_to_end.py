"""The whole pipeline on a small real slice: land -> prepare -> train (2 Horovod workers) ->
evaluate/register -> score, asserting every table, the MLflow run, the registry and the
predictions; then the consumer's view of the registered model."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import deltalake
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dlpipe import lake
from dlpipe.refs import SPLITS
from tests.conftest import WITHOUT_DLPIPE, stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(spark, small_landing, prepared_small):
    _, landed = small_landing
    cfg, prepared = prepared_small
    trained = stage("train", spark, cfg)
    evaluated = stage("evaluate", spark, cfg)  # finds the latest training run by itself
    scored = stage("score", spark, cfg)
    return cfg, landed, prepared, trained, evaluated, scored


def test_prepare_writes_three_versioned_tables(pipeline):
    cfg, landed, prepared, *_ = pipeline
    assert prepared["input_files"] == landed["files_written"] + landed["files_already_there"] == 300
    assert prepared["accepted"] + prepared["rejected"] == prepared["input_files"] and prepared["rejected"] == 0
    rows = 0
    for split in SPLITS:
        table = prepared["tables"][split]
        delta = deltalake.DeltaTable(table["uri"])  # readable without Spark
        assert delta.version() == table["version"]
        data = delta.to_pyarrow_table()
        assert data.num_rows == table["rows"] > 0
        assert set(data.column_names) >= {"key", "label", "pixels", "height", "width", "channels"}
        assert str(data.schema.field("pixels").type) == "binary"  # the image's bytes (docs/pipelines.md)
        assert {len(p) for p in data.column("pixels").to_pylist()} == {28 * 28}
        rows += table["rows"]
    assert rows == prepared["accepted"]
    assert prepared["tables"]["train"]["rows"] > 3 * prepared["tables"]["test"]["rows"]


def test_train_logs_run_with_versions_curves_and_metrics(pipeline):
    cfg, _, prepared, trained, *_ = pipeline
    assert trained["world_size"] == 2 and trained["backend"] == "horovod"
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(trained["run_id"])
    for split in SPLITS:  # the TableRef form, as in the model's lineage tags
        table = prepared["tables"][split]
        assert run.data.params[f"table.{split}"] == f"{table['uri']}@{table['version']}"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(trained["run_id"], "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value < history[0].value
    artifacts = {a.path for a in MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(trained["run_id"], "plots")}
    assert {"plots/training_curves.png", "plots/confusion_matrix_val.png", "plots/confusion_matrix_test.png"} <= artifacts
    config = json.loads(Path(MlflowClient(cfg.mlflow.tracking_uri).download_artifacts(trained["run_id"], "config.json")).read_text())
    assert config["train"]["epochs"] == 3


def test_evaluate_registers_champion(pipeline):
    cfg, _, _, trained, evaluated, _ = pipeline
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert evaluated["run_id"] == trained["run_id"]
    assert evaluated["champion"] and evaluated["metrics"]["test_accuracy"] >= 0.3
    version = client.get_model_version_by_alias("e2e_cnn", "champion")
    assert int(version.version) == evaluated["model_version"]
    assert version.run_id == trained["run_id"]
    assert version.tags["dlpipe.table.train"].endswith(f"@{trained['tables']['train']['version']}")
    assert client.get_run(trained["run_id"]).data.metrics["test_accuracy"] == pytest.approx(evaluated["metrics"]["test_accuracy"])


def test_score_appends_predictions_with_model_version(spark, pipeline):
    cfg, _, prepared, _, evaluated, scored = pipeline
    assert scored["model_uri"] == f"models:/e2e_cnn/{evaluated['model_version']}"
    # the test table the model's lineage names, said in the summary
    assert scored["input"] == {k: prepared["tables"]["test"][k] for k in ("uri", "version")}
    assert scored["input_chosen_by"] == "the model's lineage" and scored["predictions"]["rows_rejected"] == 0
    predictions = deltalake.DeltaTable(scored["predictions"]["uri"], version=scored["predictions"]["version"]).to_pandas()
    assert len(predictions) == prepared["tables"]["test"]["rows"] == scored["predictions"]["rows_appended"]
    assert set(predictions["model_version"]) == {evaluated["model_version"]}
    assert sorted(predictions["key"]) == sorted(deltalake.DeltaTable(prepared["tables"]["test"]["uri"]).to_pandas()["key"])
    probabilities = predictions["probabilities"].iloc[0]
    assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-4
    assert predictions["prediction"].iloc[0] == max(range(10), key=lambda i: probabilities[i])
    # the job's accuracy agrees with the predictions it wrote
    test = deltalake.DeltaTable(prepared["tables"]["test"]["uri"]).to_pandas().set_index("key")["label"]
    predicted = predictions.set_index("key")["prediction"]
    accuracy = (predicted == test.reindex(predicted.index)).mean()
    assert accuracy == pytest.approx(evaluated["metrics"]["test_accuracy"])


CONSUMER = WITHOUT_DLPIPE + textwrap.dedent("""
    try:
        import dlpipe
        sys.exit("dlpipe should not be importable here")
    except ImportError:
        pass
    import mlflow, pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model("models:/e2e_cnn@champion")
    rows = json.loads(sys.argv[2])
    out = model.predict(pd.DataFrame({"pixels": rows}))
    print(json.dumps({"prediction": out["prediction"].tolist(), "label_name": out["label_name"].tolist(),
                      "signature": model.metadata.signature.inputs.input_names()}))
""")


def test_scoring_again_replaces_its_slice(spark, pipeline):
    cfg, _, prepared, _, _, scored = pipeline
    again = stage("score", spark, cfg)  # same model version, same run date: the slice is replaced in one commit
    assert again["predictions"]["version"] == scored["predictions"]["version"] + 1
    assert again["predictions"]["rows_appended"] == again["predictions"]["rows_replaced"] == prepared["tables"]["test"]["rows"]
    table = deltalake.DeltaTable(scored["predictions"]["uri"]).to_pandas()
    assert len(table) == prepared["tables"]["test"]["rows"] and table["key"].is_unique
    assert set(table["run_date"].astype(str)) == {again["run_date"]}


def test_consumer_loads_champion_without_dlpipe(pipeline, tmp_path):
    cfg, _, prepared, *_ = pipeline
    test = deltalake.DeltaTable(prepared["tables"]["test"]["uri"]).to_pandas().head(5)
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(script), cfg.mlflow.tracking_uri,
                           json.dumps([(np.frombuffer(p, np.uint8) / 255).tolist() for p in test["pixels"]])],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["prediction"]) == 5 and out["signature"] == ["pixels"]
    assert all(cfg.data.classes[p] == name for p, name in zip(out["prediction"], out["label_name"]))


def test_delta_versions_advance_on_rerun(spark, pipeline):
    cfg, _, prepared, *_ = pipeline
    again = stage("prepare", spark, cfg)
    for split in SPLITS:
        assert again["tables"][split]["version"] == prepared["tables"][split]["version"] + 1
        old = lake.read_table(spark, cfg.table_uri(split), prepared["tables"][split]["version"])
        new = lake.read_table(spark, cfg.table_uri(split), again["tables"][split]["version"])
        # the hash split never moves a row between tables
        assert sorted(r.key for r in old.select("key").collect()) == sorted(r.key for r in new.select("key").collect())
