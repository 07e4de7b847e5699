"""`dlpipe bench tune`: what running trials at once buys, what TPE finds against random search with
the same number of trials, and what the median pruner saves; every study run by `dlpipe tune`
itself (dlpipe.stages.tune) on the prepared Fashion-MNIST tables, trials in Spark tasks of one core
each, a small CNN on a slice of the training rows (data.label_fraction: a stable hash of the key, so
every class is in it; the val table is whole).

Every study gets its own Optuna storage and MLflow store in a temporary folder, so the user's
registry and experiments are not touched. The baseline of each ratio runs in the same command:
tune.parallel 1 for the speedup (the same 8 trials: a seeded random sampler asks the same values),
random search for TPE (same space, trials, epochs, seeds), no pruner for the pruner."""

from __future__ import annotations

import statistics
import tempfile

from benchmarks.common import say
from dlpipe.config import Config, from_raw
from dlpipe.stages import tune
from dlpipe.tuning import Param

SPACE = [Param("train.lr", "loguniform", (1e-4, 3e-2)),
         Param("model.cnn.dropout", "uniform", (0.0, 0.5)),
         Param("model.cnn.hidden", "choice", ([32], [64], [128]))]
NET = {"model.name": "cnn", "model.task": "classification", "model.cnn.blocks": [{"channels": 8}, {"channels": 16}],
       "train.batch_size": 64, "train.checkpoint_every": 0, "train.lr_schedule": "cosine", "train.max_rows": 0}
TRAIN_ROWS = 56_000  # Fashion-MNIST's train split as prepare writes it (80% of 70,000)


def run(spark, cfg: Config, parallel_trials: int = 8, parallel_rows: int = 12000, parallel_epochs: int = 2,
        search_trials: int = 16, search_rows: int = 3000, search_epochs: int = 3, seeds: tuple = (0, 1, 2)) -> dict:
    root = tempfile.mkdtemp(prefix="dlpipe-bench-tune-")
    base = tune.with_keys(cfg.to_dict(), NET | {
        "mlflow.tracking_uri": f"sqlite:///{root}/mlflow.db", "mlflow.artifact_root": f"{root}/mlartifacts",
        "tune.storage": f"sqlite:///{root}/optuna.db", "registry.model_name": "bench_tune", "tune.alias": "",
        "registry.min_accuracy": 0.0})

    def study(name: str, **keys) -> dict:
        raw = tune.with_keys(base, {"tune.study": name, "tune.best_conf": f"{root}/{name}.best.yaml", **keys})
        summary = tune.run(spark, from_raw(raw), SPACE, raw)
        say(f"study {name}: best {summary['best']['value']:.4f}, {summary['trials']}, trials took {summary['trials_seconds']:.0f} s")
        return summary

    def params(name: str) -> list:
        import optuna

        loaded = optuna.load_study(study_name=name, storage=base["tune"]["storage"])
        return sorted(str(sorted(t.params.items())) for t in loaded.trials)

    # 1. the same trials one at a time and two at a time, after a study that starts the Python workers
    sized = {"data.label_fraction": parallel_rows / TRAIN_ROWS, "train.epochs": parallel_epochs, "tune.trials": parallel_trials,
             "tune.algorithm": "random", "tune.seed": 0}
    study("warm-up", **{**sized, "tune.parallel": 2, "tune.trials": 2, "train.epochs": 1})
    one = study("parallel-1", **sized, **{"tune.parallel": 1})
    two = study("parallel-2", **sized, **{"tune.parallel": 2})
    parallel = {"trials": parallel_trials, "train_rows": parallel_rows, "epochs": parallel_epochs,
                "seconds_parallel_1": one["trials_seconds"], "seconds_parallel_2": two["trials_seconds"],
                "parallel_speedup": one["trials_seconds"] / two["trials_seconds"],
                "same_trials": params("parallel-1") == params("parallel-2")}
    say(f"parallel: {parallel['seconds_parallel_1']:.0f} s one at a time, {parallel['seconds_parallel_2']:.0f} s two "
        f"at a time: speedup {parallel['parallel_speedup']:.2f} (goal >= 1.6)")

    # 2. random search against TPE, the same budget, three study seeds; 3. the median pruner
    sized = {"data.label_fraction": search_rows / TRAIN_ROWS, "train.epochs": search_epochs, "tune.trials": search_trials, "tune.parallel": 2}
    best = {"random": [], "tpe": []}
    runs = {}
    for seed in seeds:
        for algorithm in best:
            runs[(algorithm, seed)] = study(f"{algorithm}-{seed}", **sized, **{"tune.algorithm": algorithm, "tune.seed": seed})
            best[algorithm].append(runs[(algorithm, seed)]["best"]["value"])
    search = {"trials": search_trials, "train_rows": search_rows, "epochs": search_epochs, "seeds": list(seeds),
              "random_best": statistics.mean(best["random"]), "tpe_best": statistics.mean(best["tpe"]),
              "random_per_seed": best["random"], "tpe_per_seed": best["tpe"]}
    say(f"search: best val accuracy after {search_trials} trials, mean of {len(seeds)} seeds: random "
        f"{search['random_best']:.4f}, TPE {search['tpe_best']:.4f}")
    plain = runs[("random", seeds[0])]
    pruned = study(f"random-{seeds[0]}-median", **sized, **{"tune.algorithm": "random", "tune.seed": seeds[0],
                                                           "tune.pruner": "median", "tune.startup_trials": 4})
    pruning = {"pruner": "median", "startup_trials": 4, "warmup_epochs": 1,
               "pruned_fraction": pruned["trials"]["pruned"] / search_trials,
               "seconds_without": plain["trials_seconds"], "seconds_with": pruned["trials_seconds"],
               "time_saved": 1 - pruned["trials_seconds"] / plain["trials_seconds"],
               "best_without": plain["best"]["value"], "best_with": pruned["best"]["value"]}
    say(f"pruning: {pruning['pruned_fraction']:.0%} of trials pruned, {pruning['time_saved']:.0%} of the time saved, "
        f"best {pruning['best_with']:.4f} with the pruner, {pruning['best_without']:.4f} without")
    return {"step": "bench tune", "tables": two["tables"], "placement": "tasks (one Spark task, one core, per trial)",
            "space": {p.key: {p.kind: list(p.args)} for p in SPACE}, "stores": root,
            "cases": {"parallel": parallel, "search": search, "pruning": pruning},
            "goals": {"parallel_speedup": ">= 1.6", "tpe_best": ">= random_best"}}
