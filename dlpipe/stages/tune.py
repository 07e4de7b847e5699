"""`dlpipe tune --space FILE`: a hyperparameter study on the cluster. Optuna samples each trial's
values (dlpipe.tuning); a trial is a training run (dlpipe.stages.train, as a Trial) on the table
versions the study pinned, in an MLflow child run of the study's parent run. Trials run
`tune.parallel` at a time, each in one Spark task (placement: tasks), or one at a time on
train.num_workers workers (placement: distributed).

The study lives in Optuna's storage, so the same command after a killed driver continues it:
finished trials stay finished, a trial the dead driver left running is run again. At the end the
parent run gets the study's plots, the best trial's conf file is written, and its model is
evaluated on the test table and registered (alias tune.alias)."""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from dlpipe import registry, tracking, tuning, typed
from dlpipe.config import Config, from_raw
from dlpipe.errors import ConfigError, DlpipeError
from dlpipe.launchers import task_slots
from dlpipe.refs import SPLITS, TableRef
from dlpipe.stages import evaluate
from dlpipe.stages import train as train_stage


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def check(cfg: Config, space: list[tuning.Param], raw: dict) -> None:
    """Before Spark starts: every value of the space gives a valid config, a grid is finite, the
    study has a storage."""
    for param in space:
        for value in param.examples():
            try:
                from_raw(with_keys(raw, {param.key: value}))
            except ConfigError as exc:
                raise ConfigError(f"search space key '{param.key}' value {value!r}: {exc}") from None
    if cfg.tune.algorithm == "grid":
        tuning.grid_points(space)
    tuning.storage_url(cfg.tune, cfg.paths.lake)


def run(spark, cfg: Config, space: list[tuning.Param], raw: dict) -> dict:
    """`raw`: the keys the --conf file and the --set items set (config.raw_config), which each trial's
    config is built from with the trial's values set last; `cfg` is the config they give."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    tune = cfg.tune
    experiment_id = tracking.setup(cfg.mlflow)
    client = MlflowClient()
    metric, direction = tuning.objective(tune, cfg.model.task)
    name = tune.study or f"{cfg.registry.model_name}-tune"
    url = tuning.storage_url(tune, cfg.paths.lake)
    pruner = tuning.pruner_spec(tune)
    study = optuna.create_study(study_name=name, storage=tuning.storage(url), sampler=tuning.sampler(tune, space),
                                pruner=pruner.build(), direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"config key 'tune.direction': study {name} was run to {study.direction.name.lower()} "
                          f"its metric, got {direction}; use another tune.study")
    tables = _pinned_tables(study, cfg)
    pins = {"train.tables": {s: str(ref) for s, ref in tables.items()}, "train.checkpoint_every": 0}
    parent_id = _parent_run(client, experiment_id, name, cfg, space, url)
    rerun = _recover(study, client, experiment_id, name)
    target = tune.trials
    if tune.algorithm == "grid":
        points = tuning.grid_points(space)
        target = min(target, len(points))
        for point in points[:target]:
            study.enqueue_trial(point, skip_if_exists=True)
    counted = lambda: [t for t in study.get_trials(deepcopy=False)  # noqa: E731
                       if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                       or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
    left = max(target - len(counted()), 0)
    launcher = "spark_task" if tune.placement == "tasks" else cfg.train.backend
    at_once = tune.parallel if tune.placement == "tasks" else 1
    say(f"study {name} ({tune.algorithm}, {direction} {metric}): {target - left} of {target} trials done, "
        f"{left} to run, {at_once} at a time ({launcher}); storage {_masked(url)}; parent run {parent_id}")
    fixed = {p.key: p.distribution() for p in space}
    if launcher == "spark_task" and at_once > task_slots(spark):
        say(f"tune.parallel={at_once}, but this Spark application runs {task_slots(spark)} tasks at once: trials wait for a slot")

    def one(trial) -> tuple:
        values = {p.key: tuning.decode(p, trial.params[p.key]) for p in space}
        child = client.create_run(experiment_id, run_name=f"{name}-trial-{trial.number}", tags={
            "mlflow.parentRunId": parent_id, "dlpipe.tune.study": name, "dlpipe.tune.trial": str(trial.number)}).info.run_id
        trial.set_user_attr("run_id", child)
        t0 = time.perf_counter()
        try:
            trial_cfg = from_raw(with_keys(raw, pins | values))
            spec = tuning.TrialSpec(url, name, trial._trial_id, metric, pruner)
            summary = train_stage.run(
                spark, trial_cfg.train, trial_cfg.model, trial_cfg.data, trial_cfg.mlflow,
                model_name=trial_cfg.registry.model_name, table_uris={}, resolved_config=trial_cfg.to_dict(),
                trial=train_stage.Trial(child, launcher, spec))
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded and the study goes on
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
            client.set_tag(child, "dlpipe.tune.error", error)
            if client.get_run(child).info.status == "RUNNING":
                client.set_terminated(child, "FAILED")
            return trial, values, None, error, time.perf_counter() - t0
        return trial, values, summary, None, time.perf_counter() - t0

    looping = time.perf_counter()
    with mlflow.start_run(run_id=parent_id):
        if at_once == 1:  # in this thread: Horovod's launcher sets signal handlers, which only the main thread may
            for _ in range(left):
                _record(study, one(study.ask(fixed)), metric, len(counted()) + 1, target)
        else:
            with ThreadPoolExecutor(at_once) as pool:
                running: set = set()
                asked = 0
                while asked < left or running:
                    while len(running) < at_once and asked < left:
                        running.add(pool.submit(one, study.ask(fixed)))
                        asked += 1
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        _record(study, future.result(), metric, len(counted()) + 1, target)
        trials_seconds = time.perf_counter() - looping
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        states = {s: len(study.get_trials(deepcopy=False, states=(getattr(TrialState, s.upper()),)))
                  for s in ("complete", "pruned", "fail")}
        mlflow.log_metrics({f"trials_{s}": n for s, n in states.items()})
        if not complete:
            raise DlpipeError(f"study {name}: no trial finished ({states['fail']} failed, {states['pruned']} pruned); "
                              f"the errors are in the child runs of MLflow run {parent_id}")
        best = study.best_trial
        best_values = {p.key: tuning.decode(p, best.params[p.key]) for p in space}
        mlflow.log_metrics({"best_value": best.value, "best_trial": best.number})
        for path, figure in _plots(study).items():
            mlflow.log_figure(figure, path)
        best_conf = _write_best_conf(tune, name, with_keys(raw, best_values), best, tables)
        mlflow.log_artifact(str(best_conf), "best")
    run_id = best.user_attrs.get("run_id")  # none: a trial added to the study by hand, without a model
    registered = _register(spark, cfg, client, parent_id, run_id) if run_id else None  # evaluate opens the trial's run
    return {"step": "tune", "study": name, "storage": _masked(url), "parent_run_id": parent_id,
            "algorithm": tune.algorithm, "placement": tune.placement, "parallel": at_once, "metric": metric,
            "direction": direction, "tables": {s: ref.to_dict() for s, ref in tables.items()},
            "trials": {"complete": states["complete"], "pruned": states["pruned"], "failed": states["fail"],
                       "rerun_after_lost_driver": rerun},
            "best": {"trial": best.number, "value": best.value, "params": best_values, "run_id": run_id},
            "best_conf": str(best_conf), "registered": registered,
            "trials_seconds": round(trials_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1)}


def _record(study, outcome: tuple, metric: str, n: int, target: int) -> None:
    """Tell the study how a trial ended, log it on the parent run, say it."""
    from optuna.trial import TrialState

    trial, values, summary, error, seconds = outcome
    shown = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
    if error is not None:
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        say(f"trial {trial.number} ({n}/{target}) FAILED after {seconds:.0f}s: {error} [{shown}]")
        return
    if summary.get("pruned_at"):
        study.tell(trial, state=TrialState.PRUNED)
        say(f"trial {trial.number} ({n}/{target}) pruned after epoch {summary['pruned_at']} in {seconds:.0f}s [{shown}]")
        return
    value = float(summary["metrics"][metric])
    study.tell(trial, value)
    mlflow.log_metric("trial_value", value, step=trial.number)
    best = study.best_trial
    say(f"trial {trial.number} ({n}/{target}) {metric} {value:.4f} in {seconds:.0f}s [{shown}]; "
        f"best {best.value:.4f} (trial {best.number})")


def _pinned_tables(study, cfg: Config) -> dict[str, TableRef]:
    """The table versions every trial reads: those the study was started on."""
    pinned = study.user_attrs.get("tables")
    if pinned is None:
        tables = train_stage.input_tables(cfg.train.tables, cfg.model_tables())
        study.set_user_attr("tables", {s: str(ref) for s, ref in tables.items()})
        return tables
    tables = {s: TableRef.parse(pinned[s]) for s in SPLITS}
    given = {s: str(train_stage.input_tables(cfg.train.tables, {})[s]) for s in SPLITS} if cfg.train.tables else pinned
    if given != pinned:
        raise ConfigError(f"config key 'train.tables': study {study.study_name} reads {pinned}; a continued study "
                          f"reads the same versions: drop train.tables or use another tune.study")
    return tables


def _parent_run(client: MlflowClient, experiment_id: str, name: str, cfg: Config, space, url: str) -> str:
    """The study's MLflow run: the one an earlier driver started, or a new one."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`dlpipe.tune.study` = '{name}' and "
                              "tags.`dlpipe.step` = 'tune'", order_by=["attributes.start_time ASC"], max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={
        "dlpipe.step": "tune", "dlpipe.tune.study": name, "dlpipe.model_name": cfg.registry.model_name})
    params = {f"tune.{k}": v for k, v in cfg.tune.__dict__.items()} | {"tune.storage": _masked(url)}
    params |= {f"space.{p.key}": json.dumps({p.kind: list(p.args)}) for p in space}
    client.log_batch(run.info.run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
    return run.info.run_id


def _recover(study, client: MlflowClient, experiment_id: str, name: str) -> int:
    """Trials a killed driver left running: failed (uncounted), their child runs FAILED, their values
    queued to run again. Returns how many. The runs are found by tag, not by the trial's `run_id`
    attribute, so a driver killed between creating the run and recording it leaves none RUNNING."""
    from optuna.trial import TrialState

    lost = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in lost:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
        runs = client.search_runs([experiment_id], filter_string=(
            f"tags.`dlpipe.tune.study` = '{name}' and tags.`dlpipe.tune.trial` = '{t.number}' "
            "and attributes.status = 'RUNNING'"))
        for run in runs:
            client.set_tag(run.info.run_id, "dlpipe.tune.lost", "the driver running this trial went away; run again")
            client.set_terminated(run.info.run_id, "FAILED")
    if lost:
        say(f"{len(lost)} trial(s) left running by an earlier driver: {[t.number for t in lost]}; running them again")
    return len(lost)


def _plots(study) -> dict:
    import warnings

    from optuna.visualization import matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        figures = {"plots/optimization_history.png": plots.plot_optimization_history(study).figure}
        if len(study.get_trials(deepcopy=False)) > 1:
            figures["plots/parallel_coordinates.png"] = plots.plot_parallel_coordinate(study).figure
    for figure in figures.values():
        figure.set_size_inches(9, 5)
        figure.tight_layout()
    return figures


def with_keys(raw: dict, values: dict) -> dict:
    """A copy of a raw config with dotted keys set."""
    import copy

    out = copy.deepcopy(raw)
    for key, value in values.items():
        typed.merge(out, typed.nest(typed.split_key(Config, key), value))
    return out


def _write_best_conf(tune, name: str, raw: dict, best, tables) -> Path:
    """The --conf file and --set items of the study with the best trial's values: a conf file that
    `dlpipe train --conf` reads (it validates like any other)."""
    path = Path(tune.best_conf or f"{name}.best.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# dlpipe tune: the best trial ({best.number}) of study {name}, {best.value:.6g}\n"
              f"# trained on {', '.join(str(t) for t in tables.values())}\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def _register(spark, cfg: Config, client: MlflowClient, parent_id: str, run_id: str) -> dict:
    """The best trial's model, evaluated on the study's test table and registered once (a continued
    study whose best trial did not change registers nothing new); alias tune.alias."""
    tags = client.get_run(parent_id).data.tags
    name = cfg.registry.model_name
    if tags.get("dlpipe.tune.registered_run") == run_id:
        version = tags["dlpipe.tune.registered_version"]
    else:
        summary = evaluate.run(spark, cfg.data, cfg.model, cfg.registry, cfg.mlflow, run_id=run_id, promote=False)
        version = str(summary["model_version"])
        client.set_tag(parent_id, "dlpipe.tune.registered_run", run_id)
        client.set_tag(parent_id, "dlpipe.tune.registered_version", version)
    if cfg.tune.alias:
        with registry.lock(client, name, cfg.registry.lock_ttl_s, cfg.registry.lock_wait_s):
            registry.set_aliases(client, name, [(cfg.tune.alias, version)])
        say(f"best trial's model: {name} version {version}, alias {cfg.tune.alias}")
    return {"model_name": name, "version": int(version), "alias": cfg.tune.alias or None,
            "model_uri": f"models:/{name}/{version}"}


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
