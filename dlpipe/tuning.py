"""Hyperparameter search, the parts the driver and the workers share: the `tune:` config section,
the search space file, Optuna's samplers and pruners built from config, and the reporter a trial's
main worker calls every epoch (report the metric, ask whether to stop). The study loop itself is
the tune stage (dlpipe.stages.tune). Optuna is imported only where it is used.

A space file maps config keys to distributions, one line each:

    train.lr: {loguniform: [0.0003, 0.01]}
    train.weight_decay: {uniform: [0.0, 0.001]}
    train.epochs: {int: [2, 6]}                      # or {int: [2, 6, 2]}: a step
    model.cnn.hidden: {choice: [[64], [128, 64]]}    # any config values, lists included
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dlpipe.errors import ConfigError

KINDS = ("uniform", "loguniform", "int", "choice")
# keys a trial may not change: where things are stored, what is read, how the study itself runs
FIXED = ("train.tables", "train.run_name", "train.checkpoint_uri", "train.checkpoint_every", "train.resume",
         "train.backend", "train.num_workers", "train.use_gpu", "train.init_from")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """`dlpipe tune --space FILE`: a study of trials, each a training run with the space's keys set."""

    study: str = ""  # "" = <registry.model_name>-tune; rerunning with the same name continues the study
    algorithm: Literal["random", "grid", "tpe"] = "tpe"  # Optuna's RandomSampler, GridSampler, TPESampler
    trials: int = 8  # trials the study holds when done (finished, pruned or failed); grid: at most the grid
    parallel: int = 2  # trials at once (placement: tasks)
    # tasks: each trial is one Spark task on spark.task.cpus cores; distributed: one trial at a time,
    # each trained by train.backend on train.num_workers workers
    placement: Literal["tasks", "distributed"] = "tasks"
    metric: str = "auto"  # an epoch metric: loss, val_loss, <m> or val_<m> (m: accuracy, mae, mse, bpc, te); auto = val_<m>
    direction: Literal["auto", "maximize", "minimize"] = "auto"  # auto: maximize accuracy, minimize the rest
    pruner: Literal["none", "median", "asha"] = "none"  # Optuna's MedianPruner | SuccessiveHalvingPruner
    startup_trials: int = 4  # random trials before TPE models the space; finished trials before the median pruner prunes
    warmup_epochs: int = 1  # the pruner's first decision comes after this many epochs
    seed: int = 0  # of the sampler
    storage: str = ""  # Optuna storage URL (any RDB); "" = SQLite beside a local lake: <paths.lake>/_tune/studies.db
    alias: str = "challenger"  # set on the registered version of the best trial's model; "" = register only
    best_conf: str = ""  # where the best trial's conf file goes; "" = <study>.best.yaml in the working directory


def validate_tune(tune: TuneConfig, task: str) -> None:
    for key in ("trials", "parallel", "warmup_epochs"):
        if getattr(tune, key) <= 0:
            raise ConfigError(f"config key 'tune.{key}': expected a positive integer, got {getattr(tune, key)}")
    if tune.startup_trials < 0:
        raise ConfigError(f"config key 'tune.startup_trials': expected a non-negative integer, got {tune.startup_trials}")
    if tune.placement == "distributed" and tune.parallel != 1:
        raise ConfigError(f"config key 'tune.parallel': placement distributed runs one trial at a time on "
                          f"train.num_workers workers: expected 1, got {tune.parallel}")
    if tune.metric != "auto" and tune.metric not in epoch_metrics(task):
        raise ConfigError(f"config key 'tune.metric': a {task} model reports {list(epoch_metrics(task))} every epoch "
                          f"(or auto), got {tune.metric!r}")


def epoch_metrics(task: str) -> tuple[str, ...]:
    from dl.train import metric_name

    m = metric_name(task)
    return ("loss", "val_loss", m, f"val_{m}")


def objective(tune: TuneConfig, task: str) -> tuple[str, str]:
    """(the metric a trial is judged on, maximize | minimize)."""
    metric = tune.metric if tune.metric != "auto" else epoch_metrics(task)[3]
    direction = tune.direction if tune.direction != "auto" else "maximize" if metric.endswith("accuracy") else "minimize"
    return metric, direction


@dataclass(frozen=True)
class Param:
    key: str  # a dotted config key
    kind: str  # one of KINDS
    args: tuple  # (low, high[, step]) or the choices

    def distribution(self):
        import optuna.distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution([encode(v) for v in self.args])
        if self.kind == "int":
            return d.IntDistribution(self.args[0], self.args[1], step=self.args[2] if len(self.args) > 2 else 1)
        return d.FloatDistribution(self.args[0], self.args[1], log=self.kind == "loguniform")

    def values(self) -> list:
        """Every value a grid takes (choice and int only)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "int":
            return list(range(self.args[0], self.args[1] + 1, self.args[2] if len(self.args) > 2 else 1))
        raise ConfigError(f"search space key '{self.key}': tune.algorithm=grid needs choice or int values, got {self.kind}")

    def examples(self) -> list:
        """Values that stand for the whole range when the space is checked against the schema."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]


def encode(value: Any):
    """Optuna stores None, bool, int, float and str; lists and mappings travel as JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def decode(param: Param, value: Any):
    if param.kind == "choice" and isinstance(value, str) and all(not isinstance(c, str) for c in param.args):
        return json.loads(value)
    return value


def read_space(path: str | Path) -> list[Param]:
    """The space file, every entry checked for its shape; the keys are checked against the config
    schema by the tune stage (space_overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search space file {path}: expected a mapping of config keys to distributions, "
                          "e.g. `train.lr: {loguniform: [0.0003, 0.01]}`")
    return [_param(path, str(key), spec) for key, spec in raw.items()]


def _param(path: Path, key: str, spec: Any) -> Param:
    where = f"search space {path} key '{key}'"
    if not key.startswith(("train.", "model.")) or key in FIXED:
        raise ConfigError(f"{where}: a trial may set train.* and model.* keys, except {', '.join(FIXED)}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: expected one of {{uniform: [low, high]}}, {{loguniform: [low, high]}}, "
                          f"{{int: [low, high]}} (or [low, high, step]), {{choice: [values]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} expects a list, got {args!r}")
    if kind == "choice":
        if len({json.dumps(a, sort_keys=True) for a in args}) != len(args):
            raise ConfigError(f"{where}: choice values must be distinct, got {args!r}")
        return Param(key, kind, tuple(args))
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    integers = all(isinstance(a, int) and not isinstance(a, bool) for a in args)
    if kind == "int" and not (integers and len(args) in (2, 3) and args[0] <= args[1] and (len(args) == 2 or args[2] > 0)):
        raise ConfigError(f"{where}: int expects [low, high] or [low, high, step] integers with low <= high, got {args!r}")
    if kind != "int" and not (numbers and len(args) == 2 and args[0] < args[1]):
        raise ConfigError(f"{where}: {kind} expects [low, high] numbers with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}: loguniform expects a positive low, got {args[0]!r}")
    return Param(key, kind, tuple(float(a) for a in args) if kind != "int" else tuple(args))


def sampler(tune: TuneConfig, space: list[Param]):
    """grid: the tune stage enqueues every point (Study.enqueue_trial); Optuna's GridSampler stops a
    study only from inside Study.optimize, and trials here are asked and told from the driver."""
    import optuna

    if tune.algorithm in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=tune.seed)
    # constant_liar: trials running at once are assumed to end badly, so parallel asks spread out
    return optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=tune.startup_trials, constant_liar=True)


def grid_points(space: list[Param]) -> list[dict]:
    """Every combination of the space's values, in order, as Optuna params."""
    import itertools

    return [dict(zip([p.key for p in space], combo))
            for combo in itertools.product(*([encode(v) for v in p.values()] for p in space))]


@dataclass(frozen=True)
class PrunerSpec:
    name: str  # none | median | asha
    startup_trials: int
    warmup_epochs: int

    def build(self):
        import optuna

        if self.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs)
        if self.name == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.warmup_epochs)
        return optuna.pruners.NopPruner()


def pruner_spec(tune: TuneConfig) -> PrunerSpec:
    return PrunerSpec(tune.pruner, tune.startup_trials, tune.warmup_epochs)


def storage_url(tune: TuneConfig, lake: str) -> str:
    if tune.storage:
        return tune.storage
    if "://" in lake and not lake.startswith("file://"):
        raise ConfigError(f"config key 'tune.storage': paths.lake={lake} is not a local folder, so the study cannot "
                          "live beside it; set an Optuna storage URL (sqlite:///..., postgresql://...) every "
                          "executor can reach")
    folder = Path(lake.removeprefix("file://")) / "_tune"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder}/studies.db"


def storage(url: str):
    import optuna

    from sqlalchemy.exc import IntegrityError, OperationalError

    # several processes (the driver's threads, trials in Spark tasks) write the same SQLite file
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (IntegrityError, OperationalError):  # other processes are creating the schema at the same moment
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


@dataclass(frozen=True)
class TrialSpec:
    """What a trial's main worker needs to report to its study: shipped inside the TrainTask."""

    storage: str
    study: str
    trial_id: int
    metric: str
    pruner: PrunerSpec


class Reporter:
    """Called by the main worker after every epoch: report the metric, True when the pruner says stop."""

    def __init__(self, spec: TrialSpec):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=spec.study, storage=storage(spec.storage), pruner=spec.pruner.build())
        self.trial, self.metric, self.pruned_at = optuna.trial.Trial(study, spec.trial_id), spec.metric, None

    def __call__(self, metrics: dict) -> bool:
        self.trial.report(float(metrics[self.metric]), int(metrics["epoch"]))
        if self.trial.should_prune():
            self.pruned_at = int(metrics["epoch"])
            return True
        return False
