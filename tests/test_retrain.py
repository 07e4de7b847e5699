"""Scheduled retraining against a real `mlflow server` on 127.0.0.1: no new data -> nothing;
new data -> a challenger on the new table versions; a worse challenger is kept as `challenger`,
a better one is promoted; rollback; consumers through the alias; two concurrent retrains."""

import json
import os
import subprocess
import sys
import textwrap

import deltalake
import numpy as np
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from dlpipe import registry
from dlpipe.refs import SPLITS
from dlpipe.stages.retrain import OUTCOME
from tests.conftest import WITHOUT_DLPIPE, make_config, stage

pytestmark = pytest.mark.slow
NAME = "retrain_cnn"
# deliberately different strengths (same seed): near-untrained, a little trained, trained
WEAK = ["train.lr=0.0000001", "train.epochs=1", "train.max_rows=32"]
MEDIUM = ["train.epochs=1"]
GOOD = ["train.epochs=5", "train.lr=0.003"]


@pytest.fixture(scope="module")
def base(small_landing, mlflow_server, tmp_path_factory):
    landing_cfg, _ = small_landing
    root = tmp_path_factory.mktemp("retrain")
    common = [
        f"paths.landing={landing_cfg.paths.landing}", f"data.name={landing_cfg.data.name}",
        f"data.classes={json.dumps(landing_cfg.data.classes)}", "train.batch_size=16",
        "model.cnn.blocks=[{channels: 8}, {channels: 16}]", "model.cnn.hidden=[32]", "train.backend=local", "train.checkpoint_every=0",
        f"registry.model_name={NAME}", "registry.min_accuracy=0.0", "registry.min_improvement=0.02",
        f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=retrain",
    ]

    def cfg(*overrides):
        return make_config(root, *common, *overrides)

    return cfg, root


def client(cfg):
    return MlflowClient(cfg.mlflow.tracking_uri)


def versions(cfg):
    return sorted(int(v.version) for v in client(cfg).search_model_versions(f"name = '{NAME}'"))


def test_first_retrain_makes_a_champion_then_no_new_data(spark, base):
    cfg, _ = base
    stage("prepare", spark, cfg())
    first = stage("retrain", spark, cfg(*MEDIUM))
    assert first["action"] == "promoted" and first["champion_before"] is None
    champion = client(cfg()).get_model_version_by_alias(NAME, "champion")
    assert int(champion.version) == first["champion_after"] == first["challenger_version"]
    # lineage on the version: tables, rows, config hash + copy, code version, metrics
    tags = champion.tags
    for split in SPLITS:
        table = first["tables"][split]
        assert tags[f"dlpipe.table.{split}"] == f"{table['uri']}@{table['version']}"
        assert int(tags[f"dlpipe.rows.{split}"]) == deltalake.DeltaTable(table["uri"], version=table["version"]).to_pyarrow_table().num_rows
    assert tags["dlpipe.rows.train_used"] == tags["dlpipe.rows.train"]  # max_rows=0: every row
    config = json.loads(open(mlflow.artifacts.download_artifacts(tags["dlpipe.config_artifact"],
                                                                  tracking_uri=cfg().mlflow.tracking_uri)).read())
    assert registry.config_hash(config) == tags["dlpipe.config_sha256"] and config["train"]["epochs"] == 1
    assert tags["dlpipe.code.package_version"] and len(tags["dlpipe.code.git_sha"]) in (40, len("unknown"))
    assert 0 <= float(tags["dlpipe.metric.test_accuracy"]) <= 1 and float(tags["dlpipe.metric.test_log_loss"]) > 0
    assert champion.tags[OUTCOME].startswith("promoted: no champion yet")

    before = versions(cfg())
    again = stage("retrain", spark, cfg(*MEDIUM))
    assert again["action"] == "none" and again["reason"].startswith("no new data")
    assert versions(cfg()) == before


def test_new_data_worse_challenger_is_not_promoted(spark, base):
    cfg, _ = base
    champion = client(cfg()).get_model_version_by_alias(NAME, "champion")
    prepared = stage("prepare", spark, cfg())  # new versions of the training tables
    out = stage("retrain", spark, cfg(*WEAK))
    assert out["action"] == "not promoted"
    assert out["tables"]["train"]["version"] == prepared["tables"]["train"]["version"]
    assert registry.tables_of(client(cfg()).get_model_version(NAME, str(out["challenger_version"])))["train"] == (
        prepared["tables"]["train"]["uri"], prepared["tables"]["train"]["version"])
    assert "below registry.min_improvement" in out["reason"]
    # champion and challenger were compared on the same (new) holdout version
    assert out["champion_metrics_on_holdout"]["test_accuracy"] > out["challenger_metrics"]["test_accuracy"]
    aliases = client(cfg()).get_registered_model(NAME).aliases
    assert aliases["champion"] == champion.version and aliases["challenger"] == str(out["challenger_version"])

    # the same inputs again: nothing happens
    before = versions(cfg())
    again = stage("retrain", spark, cfg(*WEAK))
    assert again["action"] == "none" and "already trained on these table versions" in again["reason"]
    assert versions(cfg()) == before


def test_better_challenger_is_promoted_and_rollback(spark, base):
    cfg, _ = base
    old = client(cfg()).get_model_version_by_alias(NAME, "champion")
    stage("prepare", spark, cfg())
    out = stage("retrain", spark, cfg(*GOOD))
    assert out["action"] == "promoted", out["reason"]
    assert out["challenger_metrics"]["test_accuracy"] >= out["champion_metrics_on_holdout"]["test_accuracy"] + 0.02
    aliases = client(cfg()).get_registered_model(NAME).aliases
    assert aliases["champion"] == str(out["challenger_version"]) and aliases["previous"] == old.version

    described = registry.describe(client(cfg()), NAME)
    assert set(described["aliases"]) >= {"champion", "previous", "challenger"}
    assert described["aliases"]["champion"]["tables"]["train"]["version"] == out["tables"]["train"]["version"]
    proc = subprocess.run([sys.executable, "-m", "dlpipe.cli", "models", "describe", NAME, "--set",
                           f"mlflow.tracking_uri={cfg().mlflow.tracking_uri}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"champion: version {out['challenger_version']}" in proc.stdout and "config sha256" in proc.stdout

    rolled = registry.rollback(client(cfg()), NAME, 60, 60)
    aliases = client(cfg()).get_registered_model(NAME).aliases
    assert aliases["champion"] == old.version and aliases["rolled_back"] == str(out["challenger_version"])
    assert "previous" not in aliases and rolled["previous"] is None
    with pytest.raises(LookupError, match="no previous version"):
        registry.rollback(client(cfg()), NAME, 60, 60)
    # a rolled-back version is not re-promoted by the next run on the same tables
    assert stage("retrain", spark, cfg(*GOOD))["action"] == "none"
    # restore the better model for the consumer tests
    registry.set_aliases(client(cfg()), NAME, [("champion", str(out["challenger_version"])), ("previous", old.version),
                                               ("rolled_back", None)])


CONSUMER = WITHOUT_DLPIPE + textwrap.dedent("""
    import mlflow, pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model(f"models:/{sys.argv[2]}@champion")
    out = model.predict(pd.DataFrame({"pixels": json.loads(sys.argv[3])}))
    print(json.dumps({"prediction": out["prediction"].tolist(), "version": model.metadata.run_id,
                      "example": model.metadata.saved_input_example_info is not None,
                      "signature": model.metadata.signature.inputs.input_names()}))
""")


def test_consumer_loads_champion_through_server_without_dlpipe(base, tmp_path):
    cfg, _ = base
    champion = client(cfg()).get_model_version_by_alias(NAME, "champion")
    test_uri, test_version = registry.tables_of(champion)["test"]
    test = deltalake.DeltaTable(test_uri, version=test_version).to_pandas().head(4)
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(script), cfg().mlflow.tracking_uri, NAME,
                           json.dumps([(np.frombuffer(p, np.uint8) / 255).tolist() for p in test["pixels"]])],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["prediction"]) == 4 and out["signature"] == ["pixels"] and out["example"]
    assert out["version"] == champion.run_id


def test_spark_udf_scores_through_the_alias(spark, base):
    from pyspark.sql import functions as F

    from dlpipe import lake

    cfg, _ = base
    mlflow.set_tracking_uri(cfg().mlflow.tracking_uri)
    champion = client(cfg()).get_model_version_by_alias(NAME, "champion")
    test_uri, test_version = registry.tables_of(champion)["test"]
    udf = mlflow.pyfunc.spark_udf(spark, f"models:/{NAME}@champion")
    images = lake.read_table(spark, test_uri, test_version)
    scored = images.select("label", udf(F.struct("pixels")).alias("out")).select("label", "out.*").toPandas()
    assert len(scored) == images.count() > 0
    accuracy = (scored["prediction"] == scored["label"]).mean()
    assert accuracy == pytest.approx(float(champion.tags["dlpipe.metric.test_accuracy"]))
    assert set(scored["label_name"]) <= set(cfg().data.classes)


def test_two_concurrent_retrains_promote_once(spark, base, tmp_path):
    cfg, root = base
    old = client(cfg()).get_model_version_by_alias(NAME, "champion")
    # the champion must lose against MEDIUM on new data: make the weak version champion
    weak = min(client(cfg()).search_model_versions(f"name = '{NAME}'"), key=lambda v: registry.metric_of(v, "test_accuracy"))
    registry.set_aliases(client(cfg()), NAME, [("champion", str(weak.version))])
    stage("prepare", spark, cfg())
    common = [f"paths.landing={cfg().paths.landing}", f"paths.lake={cfg().paths.lake}",
              f"data.name={cfg().data.name}", f"data.classes={json.dumps(cfg().data.classes)}", "train.batch_size=16",
              "model.cnn.blocks=[{channels: 8}, {channels: 16}]", "model.cnn.hidden=[32]", "train.backend=local", "train.checkpoint_every=0",
              f"registry.model_name={NAME}", "registry.min_accuracy=0.0", "registry.min_improvement=0.02",
              f"mlflow.tracking_uri={cfg().mlflow.tracking_uri}", "mlflow.experiment=retrain",
              "spark.master=local[1]", "spark.conf.spark.driver.memory=1g", "spark.conf.spark.ui.enabled=false", *MEDIUM]
    args = [a for item in common for a in ("--set", item)]
    procs = [subprocess.Popen([sys.executable, "-m", "dlpipe.cli", "retrain", *args, "--summary", str(tmp_path / f"{i}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    summaries = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    actions = sorted(s["action"] for s in summaries)
    assert actions.count("promoted") == 1, [s["reason"] for s in summaries]
    winner = next(s for s in summaries if s["action"] == "promoted")
    aliases = client(cfg()).get_registered_model(NAME).aliases
    assert aliases["champion"] == str(winner["challenger_version"]) and aliases["previous"] == str(weak.version)
    assert old.version != aliases["champion"]
    promoted = [v for v in client(cfg()).search_model_versions(f"name = '{NAME}'")
                if v.tags.get(OUTCOME, "").startswith("promoted")
                and registry.tables_of(v)["train"][1] == winner["tables"]["train"]["version"]]
    assert len(promoted) == 1
    assert client(cfg()).get_registered_model(NAME).name == NAME
    with pytest.raises(Exception):
        client(cfg()).get_registered_model(f"{NAME}.lock")  # released


def test_unreachable_server_fails_in_one_line_before_training(base, tmp_path):
    import socket

    cfg, root = base
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.run([sys.executable, "-m", "dlpipe.cli", "retrain", "--set", f"paths.lake={cfg().paths.lake}",
                           "--set", f"mlflow.tracking_uri={uri}"], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 5  # dlpipe.errors.EXIT_TRACKING
    assert proc.stderr.strip().splitlines() == [f"dlpipe: error: MLflow tracking server {uri} is unreachable "
                                                "(ConnectionError); nothing was trained or registered"]
    assert "training" not in proc.stdout
