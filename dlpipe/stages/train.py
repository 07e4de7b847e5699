"""`dlpipe train`: train on explicit table versions (train.tables, default: the newest complete
set one prepare job wrote, resolved once and logged), through the launcher train.backend names.
With train.resume=auto, continue the latest unfinished run of train.run_name from its last
checkpoint (same MLflow run, same table versions)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dl.models import build
from dlpipe import checkpoints, lake, modeling, outbox, tensors, tracking
from dlpipe.config import DataConfig, MlflowConfig, ModelConfig, TrainConfig
from dlpipe.errors import InputNotFound
from dlpipe.launchers import LAUNCHERS, TrainTask, launch
from dlpipe.refs import SPLITS, TableRef, resolve
from dlpipe.storage import join
from pipelines.records import is_timestamp

PLOTTED_ROWS = 2000  # validation rows drawn in the plots of models trained without a target
# drawn in a seeded random order: prepare may store a table class by class, so its first rows can be one class


@dataclass(frozen=True)
class Trial:
    """run() as one trial of a tuning study (dlpipe.stages.tune): into the study's child run, through
    the study's launcher, its main worker reporting to the study; no checkpoints, no resume, a pruned
    trial logs its curves but no model."""

    run_id: str  # the MLflow child run the study created
    launcher: str  # spark_task (many trials at once) or train.backend (one distributed trial at a time)
    spec: object  # dlpipe.tuning.TrialSpec


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def pinned_set(uris: dict[str, str]) -> tuple[dict[str, TableRef], str | None]:
    """(the newest train/val/test versions written by the same prepare job, that job's id). prepare
    commits the three tables one after the other, so a job that died half-way must not be mixed
    with the tables of the job before it. Tables no prepare job wrote: their latest versions, None."""
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
            return {split: TableRef(uris[split], versions_by_job[job][split]) for split in SPLITS}, job
    return {split: TableRef(uris[split], histories[split][0]["version"]) for split in SPLITS}, None


def pinned_tables(uris: dict[str, str]) -> dict[str, TableRef]:
    return pinned_set(uris)[0]


def input_tables(given: dict[str, str], default_uris: dict[str, str]) -> dict[str, TableRef]:
    """train.tables ({train, val, test: uri or uri@version}) or, when empty, pinned_tables()."""
    if not given:
        return pinned_tables(default_uris)
    return {split: resolve(given[split], key=f"train.tables.{split}") for split in SPLITS}


def run_tables(params: dict[str, str]) -> dict[str, TableRef]:
    """The table versions a training run logged (params table.<split> = uri@version)."""
    if "table.train" in params:
        return {s: TableRef.parse(params[f"table.{s}"]) for s in SPLITS}
    # runs logged before TableRef: two params per split
    return {s: TableRef(params[f"table.{s}.uri"], int(params[f"table.{s}.version"])) for s in SPLITS}


def run(spark: SparkSession, train: TrainConfig, model: ModelConfig, data: DataConfig, mlflow_cfg: MlflowConfig, *,
        model_name: str, table_uris: dict[str, str], resolved_config: dict, trial: Trial | None = None) -> dict:
    """`table_uris`: the default train/val/test tables (<paths.lake>/<data.name>_<split>);
    `resolved_config` is logged with the run and saved with the model, nothing else reads it."""
    tracking.setup(mlflow_cfg)
    client = MlflowClient()
    outbox_uri = join(train.checkpoint_uri, "outbox")  # what an earlier run still owes this store: sent first
    outbox.deliver(outbox_uri, mlflow_cfg.tracking_uri, log=print)
    resumable = None
    if train.resume == "auto" and train.checkpoint_every and trial is None:
        resumable = checkpoints.find_resumable(train.checkpoint_uri, train.run_name,
                                               finished=lambda run_id: _run_status(client, run_id) == "FINISHED",
                                               running=lambda run_id: _run_status(client, run_id) == "RUNNING")
    if resumable:
        run_id, resume_from = resumable
        tables = run_tables(client.get_run(run_id).data.params)
        say(f"resuming MLflow run {run_id} from " + (resume_from or "the start: it stopped before its first checkpoint"))
    else:
        run_id, resume_from, tables = None, "", input_tables(train.tables, table_uris)  # resolved once for the run
    say("training on " + ", ".join(f"{split} {ref}" for split, ref in tables.items()))
    classes, label_ids = modeling.label_view(data, model.task)
    column, input_shape = modeling.input_of(spark, tables["val"], data)
    if column == "ratings":
        model = modeling.with_rating_range(model, data)
    sequence = modeling.sequence_setup(spark, model, tables, data) if column in ("ids", "history", "nodes") else None
    if sequence is not None:
        classes = sequence["classes"]
    net = modeling.net_for(model, data.name, column, input_shape, len(classes), sequence)
    with tracking.TORCH_LOCK:
        build(net)  # a net that cannot be built fails here, before any worker starts
    init_from = modeling.resolve(train.init_from) if train.init_from else ""
    init_state = modeling.pretrained_state(init_from, net) if init_from and not resumable else None
    run_id = trial.run_id if trial else run_id
    pending = []  # epoch records rank 0 could not deliver (the tracking server away), sent before anything else
    # a trial's run is a child of its study's run, which may be active in this thread
    with outbox.run_or_defer(outbox_uri, mlflow_cfg.tracking_uri, pending, run_id=run_id,
                             run_name=None if run_id else f"{train.run_name}-train", nested=bool(trial)) as active:
        if not resumable:
            mlflow.set_tags({"dlpipe.step": "tune-trial" if trial else "train", "dlpipe.model_name": model_name,
                             "dlpipe.run_name": train.run_name})
            mlflow.log_dict(resolved_config, "config.json")
            mlflow.log_params({k: v for k, v in _flatten(resolved_config).items()
                               if not k.startswith(("spark.conf", "train.tables"))})
            mlflow.log_params({f"table.{split}": str(ref) for split, ref in tables.items()})
            if init_from:
                mlflow.log_param("train.init_from_resolved", init_from)
            if train.checkpoint_every and not trial:  # from now on, a killed driver's run is resumed, never left RUNNING
                checkpoints.start(checkpoints.run_dir(train.checkpoint_uri, train.run_name, active.info.run_id))
        backend = trial.launcher if trial else train.backend
        workers = train.num_workers if LAUNCHERS[backend].distributed else 1
        cores = int(spark.conf.get("spark.task.cpus", "1")) if backend == "spark_task" else (os.cpu_count() or 1) // workers
        task = TrainTask(
            net=net, train=train, labels=label_ids, label_fraction=data.label_fraction, init_state=init_state,
            train_files=lake.table_files(tables["train"].uri, tables["train"].version),
            val_files=lake.table_files(tables["val"].uri, tables["val"].version),
            tracking_uri=mlflow_cfg.tracking_uri, run_id=active.info.run_id,
            threads=max(1, cores), trial=trial.spec if trial else None,
            checkpoint_dir=checkpoints.run_dir(train.checkpoint_uri, train.run_name, active.info.run_id)
            if train.checkpoint_every else "",
            resume_from=resume_from,
            vocab=tuple(sequence["text"]["vocab"]) if sequence and sequence["text"] and net.task == "language_model" else (),
            joiner="" if data.text.unit == "char" else " ",
        )
        say(f"training {model.name} with backend={backend}, {workers} worker(s), sync={train.sync}, {train.epochs} epochs")
        result = launch(spark, task, backend, train.num_workers)
        pending.extend(result["unsent"])
        outbox.flush(client, active.info.run_id, pending)
        if not resumable:
            mlflow.log_params({"train.world_size": result["world_size"], "train.rows": result["train_rows"]})
        mlflow.log_metrics({f"worker_{i}_samples_per_sec": v for i, v in enumerate(result["worker_samples_per_sec"])})
        mlflow.log_figure(tracking.curves_figure(result["history"]), "plots/training_curves.png")
        if result.get("pruned_at"):
            mlflow.set_tag("dlpipe.tune.pruned_at_epoch", result["pruned_at"])
            return _summary(active, None, tables, result, train, resume_from)

        if sequence is not None:
            with tracking.TORCH_LOCK:
                trained = build(net)
                trained.load_state_dict(result["state_dict"])
                info = sequence_plots_and_model(spark, trained, net, tables, classes, sequence["text"], data, resolved_config)
            mlflow.set_tag("dlpipe.model_uri", info.model_uri)
            return _summary(active, info, tables, result, train, resume_from)
        val_rows = lake.dataset(*tables["val"])  # read on the driver with delta-rs: no Spark job
        example = tensors.matrix(val_rows.head(2, columns=[column]).column(0), column)
        recommender = {}
        if column == "ratings":
            recommender["items"] = modeling.rating_index(tables["train"], "item")
            if getattr(net.params, "based", "user") == "item":  # served with its training matrix (dl.models.autorec.FoldIn)
                recommender["users"] = modeling.rating_index(tables["train"], "user")
                recommender["known"] = modeling.known_ratings(tables["train"], recommender["items"],
                                                              len(recommender["users"]))
                example = recommender["known"][:2]
        with tracking.TORCH_LOCK:
            trained = build(net)
            trained.load_state_dict(result["state_dict"])
            info = tracking.log_model(trained, net, column, classes, example, resolved_config, **recommender)
        mlflow.set_tag("dlpipe.model_uri", info.model_uri)
        if trial:  # judged by its epoch metrics; evaluate draws the figures of the one registered
            return _summary(active, info, tables, result, train, resume_from)
        if net.task == "classification":
            matrix = _confusion(trained, val_rows, column, input_shape, label_ids, len(classes))
            mlflow.log_figure(tracking.confusion_figure(matrix, classes, "Validation confusion matrix"),
                              "plots/confusion_matrix_val.png")
        elif net.task in tracking.TASK_FIGURES:
            val = modeling.relabel(lake.read_table(spark, tables["val"].uri, tables["val"].version), label_ids)
            sample = val.select(column, "label").orderBy(F.rand(seed=0)).limit(PLOTTED_ROWS).toPandas()
            x = np.stack(sample[column].to_numpy()).astype(np.float32).reshape(-1, *input_shape)
            for path, figure in tracking.task_figures(trained, net.task, x, sample["label"].to_numpy(), classes).items():
                mlflow.log_figure(figure, path)
    return _summary(active, info, tables, result, train, resume_from)


def _confusion(trained, val, column: str, shape, label_ids: tuple[int, ...], num_classes: int) -> np.ndarray:
    """The trained net's confusion matrix over every val row (data.select_classes applied), streamed
    from the snapshot on the driver: no Spark job, no second copy of the model in Python workers."""
    import torch

    trained.eval()  # dropout off, batch-norm running statistics: as served
    matrix = np.zeros((num_classes, num_classes), np.int64)
    renumber = {old: new for new, old in enumerate(label_ids)}
    with torch.no_grad():
        for batch in val.to_batches(columns=[column, "label"], batch_size=1024):
            labels = batch.column("label").to_numpy(zero_copy_only=False)
            keep = np.isin(labels, label_ids) if label_ids else np.ones(len(labels), bool)
            if not keep.any():
                continue
            x = tensors.matrix(batch.column(column), column)[keep].astype(np.float32)
            predicted = trained(torch.from_numpy(x.reshape(-1, *shape))).argmax(1).numpy()
            truth = np.array([renumber[v] for v in labels[keep]]) if label_ids else labels[keep]
            np.add.at(matrix, (truth.astype(np.int64), predicted), 1)
    return matrix


def _summary(active, info, tables, result, train, resume_from) -> dict:
    final = result["history"][-1]
    summary = {"step": "train", "run_id": active.info.run_id, "model_uri": info.model_uri if info else None,
               "tables": {split: ref.to_dict() for split, ref in tables.items()}, "backend": result["backend"],
               "world_size": result["world_size"], "sync": train.sync, "resumed_from": resume_from or None,
               "device": result["device"],
               "metrics": {k: v for k, v in final.items() if k != "epoch"} | {"epochs": final["epoch"]}}
    return summary | ({"pruned_at": result["pruned_at"]} if result.get("pruned_at") else {})


def sequence_plots_and_model(spark, trained, net, tables, classes, text, data, resolved_config):
    """A recurrent net: log the pyfunc that takes raw text (an RNTN: a bracketed tree) or a window, then
    what shows how it does on the val table: the confusion matrix (scored by that pyfunc, raw text in) or the forecast against
    the actual values of the val and test windows. Word vectors: the pyfunc that takes words and a
    2-D projection of the frequent words."""
    if net.task == "embedding":  # word vectors: served by word; their map of the frequent words
        from dlpipe import words

        info = tracking.log_sequence_model(trained, net, [], text, text["vocab"][2:4], resolved_config)
        mlflow.log_figure(words.projection_figure(text["vocab"][2:], trained.vectors()[2:].numpy()),
                          "plots/word_projection.png")
        return info
    val = lake.read_table(spark, tables["val"].uri, tables["val"].version)
    if text is not None:
        column = "tree" if text.get("format") == "bracketed" else "text"  # an RNTN reads trees
        sample = val.select(column, "label").orderBy(F.rand(seed=0)).limit(PLOTTED_ROWS).toPandas()
        info = tracking.log_sequence_model(trained, net, classes, text, list(sample[column][:2]), resolved_config)
        if net.task == "classification":
            predicted = mlflow.pyfunc.load_model(info.model_uri).predict(sample[[column]])["prediction"].to_numpy()
            matrix = np.zeros((len(classes), len(classes)), np.int64)
            np.add.at(matrix, (sample["label"].to_numpy(np.int64), predicted), 1)
            mlflow.log_figure(tracking.confusion_figure(matrix, classes, f"Validation confusion matrix ({len(sample)} rows)"),
                              "plots/confusion_matrix_val.png")
        if column == "tree":  # six val trees, shortest-first among the drawn ones, every node's class
            shown = sorted(sample["tree"][:40], key=len)[::6][:6]
            mlflow.log_figure(tracking.trees_figure(trained, shown, text["vocab"], classes, text["lowercase"]),
                              "plots/trees_val.png")
        return info
    windows = {s: lake.read_table(spark, tables[s].uri, tables[s].version).select("end", "history", "target").toPandas()
               .sort_values("end") for s in ("val", "test")}
    info = tracking.log_sequence_model(trained, net, [], None, [list(map(float, windows["val"]["history"].iloc[0]))],
                                       resolved_config)
    dates = is_timestamp(data.timeseries.val_start)  # prepare parsed the times as it parses the boundaries
    mlflow.log_figure(tracking.forecast_figure(trained, windows, dates), "plots/forecast_vs_actual.png")
    return info


def _run_status(client: MlflowClient, run_id: str) -> str:
    try:
        return client.get_run(run_id).info.status
    except Exception:  # a checkpoint whose run this tracking store does not know: not ours to resume
        return "FINISHED"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
