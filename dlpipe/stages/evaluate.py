"""`dlpipe evaluate`: a training run's model on the test table its run pinned (dlpipe.evaluation),
then registered with its lineage; alias `champion` when good enough."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient
from pyspark.sql import SparkSession

from dlpipe import evaluation, lake, modeling, registry, tracking
from dlpipe.config import DataConfig, MlflowConfig, ModelConfig, RegistryConfig
from dlpipe.errors import InputNotFound
from dlpipe.stages.train import run_tables


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def latest_training_run(model_name: str, experiment_id: str, experiment: str) -> str:
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`dlpipe.step` = 'train' and tags.`dlpipe.model_name` = '{model_name}' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise InputNotFound(f"no finished training run for model {model_name!r} in experiment {experiment!r}: "
                            "run the train step first")
    return runs[0].info.run_id


def run(spark: SparkSession, data: DataConfig, model: ModelConfig, registry_cfg: RegistryConfig, mlflow_cfg: MlflowConfig,
        *, run_id: str = "", promote: bool = True) -> dict:
    """Test-set metrics for training run `run_id` ("" = the latest finished one), then register
    it; `champion` if good enough and `promote` (retrain registers without promoting and decides itself)."""
    experiment_id = tracking.setup(mlflow_cfg)
    client = MlflowClient()
    run_id = run_id or latest_training_run(registry_cfg.model_name, experiment_id, mlflow_cfg.experiment)
    train_run = client.get_run(run_id)
    model_uri = train_run.data.tags["dlpipe.model_uri"]
    tables = run_tables(train_run.data.params)
    test = tables["test"]
    classes, label_ids = evaluation.label_view(data, model.task, model_uri)
    metrics, _, matrix = evaluation.holdout(spark, model_uri, test, task=model.task, label_ids=label_ids,
                                            num_classes=len(classes))
    scores = {k: v for k, v in metrics.items() if k != "test_rows"}
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(scores)
        if matrix is not None:
            mlflow.log_figure(tracking.confusion_figure(matrix, classes, "Test confusion matrix"),
                              "plots/confusion_matrix_test.png")
            test_df = modeling.relabel(lake.read_table(spark, test.uri, test.version), label_ids)
            if "pixels" in test_df.columns:
                from dlpipe import occlusion

                mlflow.log_figure(occlusion.sample_grid(test_df, model_uri, classes), "plots/occlusion_heatmaps.png")
    say(", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" on {metrics['test_rows']} rows of {test}")
    good, why = evaluation.good_enough(model.task, metrics, registry_cfg.min_accuracy)
    name = registry_cfg.model_name
    version = registry.register(client, name, model_uri, run_id, registry.lineage_tags(client, run_id, tables, scores)).version
    champion = promote and good
    if champion:
        with registry.lock(client, name, registry_cfg.lock_ttl_s, registry_cfg.lock_wait_s):
            registry.promote(client, name, version)
        say(f"registered {name} version {version} and set alias champion")
    else:
        say(f"registered {name} version {version}" + (f"; NOT champion: {why}" if promote else ""))
    return {"step": "evaluate", "run_id": run_id, "test_table": test.to_dict(), "metrics": metrics,
            "model_name": name, "model_version": int(version), "model_uri": f"models:/{name}/{version}",
            "champion": champion}
