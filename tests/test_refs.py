"""TableRef: the one form of a table version in summaries, params, tags and config keys; "latest"
resolved once, a missing table or version named with its config key."""

import pytest
from pyspark.sql import Row

from dlpipe import lake
from dlpipe.errors import InputNotFound
from dlpipe.refs import TableRef, resolve, split_spec


def test_parse_and_print_round_trip():
    ref = TableRef.parse("s3://bucket/lake/x_train@12")
    assert ref == ("s3://bucket/lake/x_train", 12) and str(ref) == "s3://bucket/lake/x_train@12"
    assert TableRef.of(ref.to_dict()) == ref == TableRef.of(str(ref))
    assert split_spec("hdfs://user@namenode/lake/t") == ("hdfs://user@namenode/lake/t", None)
    with pytest.raises(ValueError, match="expected <table uri>@<version>"):
        TableRef.parse("/lake/x_train")


def test_resolve_latest_explicit_and_missing(spark, tmp_path):
    uri = str(tmp_path / "t")
    for n in range(3):
        lake.write_table(spark.createDataFrame([Row(n=n)]), uri)
    assert resolve("", uri) == (uri, 2) and resolve(uri) == (uri, 2)
    assert resolve(f"{uri}@1") == (uri, 1)
    with pytest.raises(InputNotFound, match=r"has no version 7 \(config key 'score.input'\); the latest is 2"):
        resolve(f"{uri}@7", key="score.input")
    with pytest.raises(InputNotFound, match=r"no Delta table at .*/nothing \(config key 'train.tables.val'\)"):
        resolve(str(tmp_path / "nothing"), key="train.tables.val")


@pytest.mark.slow
def test_train_and_score_take_the_versions_they_are_given(spark, prepared_small, tmp_path):
    """train.tables and score.input pin exact versions (whatever is latest by then), and the
    summaries, the run's params and the model's lineage say so in the one TableRef form."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    from dlpipe.refs import SPLITS
    from tests.conftest import stage, with_run

    cfg, prepared = prepared_small
    given = {s: f"{prepared['tables'][s]['uri']}@{prepared['tables'][s]['version']}" for s in SPLITS}
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, backend="local", epochs=1, tables=given, run_name="explicit_refs",
                                       checkpoint_every=0),
        registry=dataclasses.replace(cfg.registry, model_name="explicit_refs", min_accuracy=0.0))
    trained = stage("train", spark, cfg)
    assert {s: str(TableRef.of(t)) for s, t in trained["tables"].items()} == given
    params = MlflowClient(cfg.mlflow.tracking_uri).get_run(trained["run_id"]).data.params
    assert {s: params[f"table.{s}"] for s in SPLITS} == given
    evaluated = stage("evaluate", spark, with_run(cfg, trained["run_id"]))
    version = MlflowClient(cfg.mlflow.tracking_uri).get_model_version("explicit_refs", str(evaluated["model_version"]))
    assert {s: version.tags[f"dlpipe.table.{s}"] for s in SPLITS} == given
    out = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, lake=str(tmp_path / "lake")),
                              score=dataclasses.replace(cfg.score, model_uri=evaluated["model_uri"], input=given["val"]))
    scored = stage("score", spark, out)
    assert str(TableRef.of(scored["input"])) == given["val"] and scored["input_chosen_by"] == "score.input"
    assert scored["predictions"]["rows_appended"] == prepared["tables"]["val"]["rows"]
