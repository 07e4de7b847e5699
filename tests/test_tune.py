"""`dlpipe tune`: the search space file, the pruning hook of the training loop, and studies on a
real local Spark (trials in Spark tasks, trials on Horovod workers), a real MLflow store and a
real Optuna storage; a driver killed with SIGKILL and the same command run again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from dl.models import CNNConfig, ConvBlock, Net, build
from dl.train import TrainConfig, fit
from dlpipe import lake, tuning
from dlpipe.config import load_config, raw_config
from dlpipe.errors import ConfigError
from dlpipe.stages import tune
from tests.conftest import make_config, mlflow_store

# --------------------------------------------------------------------------- fast: no Spark


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("paths.lake: {choice: [a, b]}", "key 'paths.lake': a trial may set train.* and model.* keys"),
    ("train.num_workers: {int: [1, 2]}", "key 'train.num_workers': a trial may set"),
    ("train.lr: {normal: [0, 1]}", "key 'train.lr': expected one of {uniform"),
    ("train.lr: {loguniform: [0.0, 0.1]}", "key 'train.lr': loguniform expects a positive low"),
    ("train.lr: {uniform: [0.1, 0.01]}", "key 'train.lr': uniform expects [low, high] numbers with low < high"),
    ("train.epochs: {int: [2.5, 4]}", "key 'train.epochs': int expects [low, high]"),
    ("train.optimizer: {choice: [adam, adam]}", "key 'train.optimizer': choice values must be distinct"),
    ("- train.lr", "expected a mapping of config keys to distributions"),
])
def test_space_file_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match="space") as err:
        tuning.read_space(_space(tmp_path, text))
    assert message in str(err.value)


def test_space_values_are_checked_against_the_config_schema(tmp_path):
    cfg = load_config()
    for text, message in [
        ("train.optimizer: {choice: [adam, lbfgs]}", "search space key 'train.optimizer' value 'lbfgs': config key "
                                                     "'train.optimizer': expected one of ['adam', 'sgd']"),
        ("train.lr_warmup: {uniform: [0.0, 1.0]}", "unknown config key 'train.lr_warmup'"),
        ("model.cnn.dropout: {uniform: [0.0, 1.5]}", "search space key 'model.cnn.dropout' value 1.5"),
    ]:
        with pytest.raises(ConfigError) as err:
            tune.check(cfg, tuning.read_space(_space(tmp_path, text)), {})
        assert message in str(err.value)
    grid = load_config(None, ["tune.algorithm=grid"])
    with pytest.raises(ConfigError, match="tune.algorithm=grid needs choice or int values, got loguniform"):
        tune.check(grid, tuning.read_space(_space(tmp_path, "train.lr: {loguniform: [0.001, 0.1]}")), {})


def test_tune_section_is_validated_before_spark():
    with pytest.raises(ConfigError, match="'tune.parallel': placement distributed runs one trial at a time"):
        load_config(None, ["tune.placement=distributed", "tune.parallel=2"])
    with pytest.raises(ConfigError, match=r"'tune.metric': a classification model reports \['loss', 'val_loss', "
                                          r"'accuracy', 'val_accuracy'\]"):
        load_config(None, ["tune.metric=val_mae"])
    assert tuning.objective(load_config().tune, "classification") == ("val_accuracy", "maximize")
    assert tuning.objective(load_config().tune, "regression") == ("val_mae", "minimize")


def test_choices_of_lists_travel_through_optuna_and_back(tmp_path):
    (param,) = tuning.read_space(_space(tmp_path, "model.cnn.hidden: {choice: [[64], [128, 64]]}"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {json.dumps(tuning.decode(param, study.ask({param.key: param.distribution()}).params[param.key]))
             for _ in range(20)}
    assert drawn == {"[64]", "[128, 64]"}


def test_fit_stops_when_its_stop_hook_says_so():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 2, 64)
    net = Net(name="cnn", params=CNNConfig(blocks=[ConvBlock(channels=4)], hidden=[8]), input_shape=(1, 8, 8),
              num_outputs=2, task="classification")
    asked = []
    history = fit(build(net), (x, y), (x, y), TrainConfig(epochs=5, batch_size=16, checkpoint_every=0),
                  stop=lambda m: asked.append(m["epoch"]) or m["epoch"] == 2, log=lambda line: None)
    assert [h["epoch"] for h in history] == [1, 2] and asked == [1, 2]


# --------------------------------------------------------------------------- studies on Spark

SPACE = "train.lr: {choice: [0.003, 0.01]}\nmodel.cnn.hidden: {choice: [[16], [32]]}\n"


def _sets(cfg, root, *overrides):
    """--set items: the small prepared slice, this test's own MLflow store, study storage and outputs."""
    return [f"paths.landing={cfg.paths.landing}", f"paths.lake={cfg.paths.lake}", f"data.name={cfg.data.name}",
            f"data.classes={json.dumps(cfg.data.classes)}", f"mlflow.tracking_uri={mlflow_store(root)}",
            f"mlflow.artifact_root={root}/mlartifacts", "model.cnn.blocks=[{channels: 8}]", "train.batch_size=16",
            "train.epochs=1", "registry.model_name=tuned_cnn", f"tune.storage=sqlite:///{root}/optuna.db",
            f"tune.best_conf={root}/best.yaml", *overrides]


def _run(spark, cfg, overrides, space_text, root):
    space, raw = tuning.read_space(_space(root, space_text)), raw_config(None, overrides)
    tune.check(cfg, space, raw)
    return tune.run(spark, cfg, space, raw)


def _children(cfg, parent_id):
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return MlflowClient().search_runs([MlflowClient().get_run(parent_id).info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_grid_study_runs_every_point_once_in_parallel_and_registers_the_best(spark, prepared_small, tmp_path):
    overrides = _sets(prepared_small[0], tmp_path, "tune.algorithm=grid", "tune.trials=10", "tune.parallel=2")
    cfg = load_config(None, overrides)
    summary = _run(spark, cfg, overrides, SPACE, tmp_path)

    assert summary["trials"] == {"complete": 4, "pruned": 0, "failed": 0, "rerun_after_lost_driver": 0}
    study = optuna.load_study(study_name="tuned_cnn-tune", storage=tuning.storage(cfg.tune.storage))
    points = {(t.params["train.lr"], t.params["model.cnn.hidden"]) for t in study.trials}
    assert points == {(lr, h) for lr in (0.003, 0.01) for h in ("[16]", "[32]")}  # every grid point, once
    children = _children(cfg, summary["parent_run_id"])
    assert sorted(int(r.data.tags["dlpipe.tune.trial"]) for r in children) == [0, 1, 2, 3]
    assert all(r.info.status == "FINISHED" and "val_accuracy" in r.data.metrics for r in children)
    pinned = summary["tables"]["train"]
    assert pinned["version"] == lake.latest_version(cfg.table_uri("train"))  # resolved once, when the study started
    assert all(r.data.params["table.train"] == f"{pinned['uri']}@{pinned['version']}" for r in children)
    # the trials ran in Spark tasks, one core each
    assert {r.data.params["train.world_size"] for r in children} == {"1"}
    best = max(children, key=lambda r: r.data.metrics["val_accuracy"])
    assert summary["best"]["run_id"] == best.info.run_id
    assert summary["best"]["value"] == pytest.approx(best.data.metrics["val_accuracy"])

    client = MlflowClient()
    version = client.get_model_version_by_alias("tuned_cnn", "challenger")
    assert version.run_id == best.info.run_id and "dlpipe.table.test" in version.tags
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"], "plots")}
    assert artifacts == {"plots/optimization_history.png", "plots/parallel_coordinates.png"}

    reloaded = load_config(summary["best_conf"])  # the best conf file goes through the normal validation
    assert reloaded.train.lr == summary["best"]["params"]["train.lr"]
    assert reloaded.model.cnn.hidden == summary["best"]["params"]["model.cnn.hidden"]
    assert reloaded.registry.model_name == "tuned_cnn" and reloaded.train.epochs == 1

    again = _run(spark, cfg, overrides, SPACE, tmp_path)  # a finished study: nothing runs, nothing new is registered
    assert again["trials"] == summary["trials"] and again["registered"] == summary["registered"]
    assert len(_children(cfg, summary["parent_run_id"])) == 4


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_study_goes_on(spark, prepared_small, tmp_path):
    overrides = _sets(prepared_small[0], tmp_path, "tune.algorithm=grid", "tune.parallel=2")
    cfg = load_config(None, overrides)
    # a batch of 4096 rows is more than the slice's training shard holds
    summary = _run(spark, cfg, overrides, "train.batch_size: {choice: [16, 4096]}", tmp_path)

    assert summary["trials"]["complete"] == 1 and summary["trials"]["failed"] == 1
    study = optuna.load_study(study_name="tuned_cnn-tune", storage=tuning.storage(cfg.tune.storage))
    (failed,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.params["train.batch_size"] == 4096 and "fewer than one batch of 4096" in failed.user_attrs["error"]
    run = MlflowClient().get_run(failed.user_attrs["run_id"])
    assert run.info.status == "FAILED" and "fewer than one batch" in run.data.tags["dlpipe.tune.error"]
    assert summary["best"]["params"] == {"train.batch_size": 16}


@pytest.mark.slow
def test_the_median_pruner_stops_trials_worse_than_the_finished_ones(spark, prepared_small, tmp_path):
    overrides = _sets(prepared_small[0], tmp_path, "tune.algorithm=random", "tune.trials=3", "tune.parallel=2",
                      "tune.pruner=median", "tune.startup_trials=1", "tune.warmup_epochs=1", "train.epochs=3",
                      "tune.alias=\"\"")
    cfg = load_config(None, overrides)
    space = "train.lr: {loguniform: [0.001, 0.01]}"
    # an earlier trial that reached 0.99 after every epoch: no trial of this slice gets there in 3 epochs
    study = optuna.create_study(study_name="tuned_cnn-tune", storage=cfg.tune.storage, direction="maximize")
    lr = optuna.distributions.FloatDistribution(0.001, 0.01, log=True)
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 0.002}, distributions={"train.lr": lr}, value=0.99,
                                              intermediate_values={1: 0.99, 2: 0.99, 3: 0.99}))
    summary = _run(spark, cfg, overrides, space, tmp_path)
    assert summary["trials"]["pruned"] == 2 and summary["best"]["run_id"] is None  # the hand-added trial
    assert summary["registered"] is None  # ... which has no model to register
    study = optuna.load_study(study_name="tuned_cnn-tune", storage=tuning.storage(cfg.tune.storage))
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == 2
    for t in pruned:
        run = MlflowClient().get_run(t.user_attrs["run_id"])
        assert run.data.tags["dlpipe.tune.pruned_at_epoch"] == "1"  # stopped after its first epoch of 3
        history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1] and "dlpipe.model_uri" not in run.data.tags


@pytest.mark.slow
def test_distributed_placement_trains_each_trial_on_horovod_workers(spark, prepared_small, tmp_path):
    overrides = _sets(prepared_small[0], tmp_path, "tune.placement=distributed", "tune.parallel=1",
                      "tune.algorithm=random", "tune.trials=1", "train.backend=horovod", "train.num_workers=2")
    cfg = load_config(None, overrides)
    summary = _run(spark, cfg, overrides, "train.lr: {loguniform: [0.001, 0.01]}", tmp_path)
    assert summary["trials"]["complete"] == 1 and summary["placement"] == "distributed"
    children = _children(cfg, summary["parent_run_id"])
    assert {r.data.params["train.world_size"] for r in children} == {"2"}


@pytest.mark.slow
def test_a_killed_driver_continues_its_study_without_repeating_finished_trials(prepared_small, tmp_path):
    overrides = _sets(prepared_small[0], tmp_path, "tune.algorithm=random", "tune.trials=2", "tune.parallel=1",
                      "spark.master=local[2]", "spark.conf.spark.ui.enabled=false")
    space = _space(tmp_path, "train.lr: {loguniform: [0.001, 0.01]}")
    cmd = [sys.executable, "-m", "dlpipe.cli", "tune", "--space", str(space), "--summary", str(tmp_path / "s.json"),
           *(a for item in overrides for a in ("--set", item))]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    storage = f"sqlite:///{tmp_path}/optuna.db"

    def states():  # a trial's state, and whether its MLflow run is recorded yet
        try:
            trials = optuna.load_study(study_name="tuned_cnn-tune", storage=storage).trials
        except KeyError:  # the study is not created yet
            return []
        return [(t.state.name, "run_id" in t.user_attrs) for t in trials]

    child = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while states() != [("COMPLETE", True), ("RUNNING", True)]:  # one trial done, the second one training
            assert child.poll() is None, f"tune exited ({child.returncode}) before its second trial started"
            assert time.monotonic() < deadline, f"no second trial started in 300 s: {states()}"
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the driver, its JVM and its Python workers
        child.wait(timeout=30)
    before = optuna.load_study(study_name="tuned_cnn-tune", storage=storage).trials
    first_run = before[0].user_attrs["run_id"]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["trials"] == {"complete": 2, "pruned": 0, "failed": 1, "rerun_after_lost_driver": 1}
    trials = optuna.load_study(study_name="tuned_cnn-tune", storage=storage).trials
    assert trials[0].state.name == "COMPLETE" and trials[0].user_attrs["run_id"] == first_run  # not run again
    assert trials[1].state.name == "FAIL" and "error" not in trials[1].user_attrs  # lost, not failed
    rerun = [t for t in trials[2:] if t.params == trials[1].params]
    assert len(rerun) == 1 and rerun[0].state.name == "COMPLETE"  # the lost trial's values, run again
    mlflow.set_tracking_uri(mlflow_store(tmp_path))
    client = MlflowClient()
    lost = client.get_run(trials[1].user_attrs["run_id"])
    assert lost.info.status == "FAILED" and "dlpipe.tune.lost" in lost.data.tags  # never RUNNING forever
    children = client.search_runs([lost.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 2 and len({r.data.tags["dlpipe.tune.trial"] for r in finished}) == 2
    assert Path(summary["best_conf"]).is_file()


def test_recovery_fails_a_lost_trials_run_even_when_the_driver_died_before_recording_it(tmp_path):
    mlflow.set_tracking_uri(mlflow_store(tmp_path))
    client = MlflowClient()
    experiment = client.create_experiment("e")
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    done, lost = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), study.ask()
    study.tell(done, 1.0)
    tags = lambda number: {"dlpipe.tune.study": "s", "dlpipe.tune.trial": str(number)}  # noqa: E731
    finished = client.create_run(experiment, tags=tags(done.number)).info.run_id
    client.set_terminated(finished)
    orphan = client.create_run(experiment, tags=tags(lost.number)).info.run_id  # killed before set_user_attr
    assert tune._recover(study, client, experiment, "s") == 1
    assert client.get_run(orphan).info.status == "FAILED" and "dlpipe.tune.lost" in client.get_run(orphan).data.tags
    assert client.get_run(finished).info.status == "FINISHED"
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING"]  # queued to run again


def _open_storage(url):
    tuning.storage(url)


def test_processes_opening_a_new_study_file_at_the_same_moment_all_succeed(tmp_path):
    import multiprocessing

    fork = multiprocessing.get_context("fork")  # started together, every round on a file no one created yet
    for round_ in range(4):
        procs = [fork.Process(target=_open_storage, args=(f"sqlite:///{tmp_path}/{round_}.db",)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]


@pytest.mark.parametrize("name", ["fashion_cnn", "adult_mlp", "fashion_autoencoder", "fashion_som", "sunspots"])
def test_the_example_spaces_fit_their_confs(name):
    conf = f"conf/{name}.yaml"
    space = tuning.read_space(f"conf/{name}.space.yaml")
    tune.check(load_config(conf), space, raw_config(conf))  # every value of each key is a valid config


@pytest.mark.slow
def test_a_trial_whose_task_is_lost_runs_once_more(spark, prepared_small, tmp_path, capsys):
    import threading

    import psutil

    overrides = _sets(prepared_small[0], tmp_path, "tune.algorithm=random", "tune.trials=1", "tune.parallel=2",
                      "train.epochs=15", "tune.alias=\"\"")
    cfg = load_config(None, overrides)
    outcome = {}
    study = threading.Thread(target=lambda: outcome.update(summary=_run(spark, cfg, overrides, SPACE, tmp_path)),
                             daemon=True)
    study.start()
    deadline = time.monotonic() + 240
    while True:  # the trial's worker has reported an epoch: kill every Python worker of Spark (the task is lost)
        try:
            (trial,) = optuna.load_study(study_name="tuned_cnn-tune", storage=tuning.storage(cfg.tune.storage)).trials or [None]
        except KeyError:
            trial = None
        if trial is not None and trial.intermediate_values:
            break
        assert study.is_alive() and time.monotonic() < deadline, "the trial reported no epoch in 240 s"
        time.sleep(0.1)
    workers = []
    for p in psutil.Process().children(recursive=True):  # the daemon's children: the Python workers
        try:
            if "pyspark.daemon" in " ".join(p.cmdline()) and "pyspark.daemon" in " ".join(p.parent().cmdline()):
                p.kill()
                workers.append(p)
        except psutil.Error:  # exited meanwhile, or a zombie waiting for the daemon
            pass
    study.join(timeout=300)
    assert workers and outcome["summary"]["trials"]["complete"] == 1
    assert "a training task was lost (" in capsys.readouterr().out  # ... and run once more
    (trial,) = optuna.load_study(study_name="tuned_cnn-tune", storage=tuning.storage(cfg.tune.storage)).trials
    assert trial.state.name == "COMPLETE" and MlflowClient().get_run(trial.user_attrs["run_id"]).info.status == "FINISHED"
