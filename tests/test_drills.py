"""Drills: `dlpipe prepare`, `train`, `evaluate`, `score` and `retrain`, each started as its own
process and killed with SIGKILL (the driver, its JVM and its Python workers) at a seeded random
point of its progress, then the invariants every kill must keep, then the same step run again.

The kill point of a step: after its k-th progress line (k drawn in 0..K, 0 = from the start), plus a
delay drawn in [0, D) seconds, both from DLPIPE_DRILL_SEED (default 0; a run prints its points, so
a failing seed can be replayed). The invariants, after each kill and after each rerun: every Delta
table reads whole at its latest version, and the train/val/test tables form a complete set of one
prepare job; every registered version carries its lineage tags, no training run is registered
twice, and `champion` resolves to a model that loads. After each rerun: no MLflow run is left
RUNNING. In the end the pipeline holds what an uninterrupted one holds: the same rows in each split
as a clean prepare of the same files, one prediction per test row, the champion trained on the
newest prepared set."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import deltalake
import pytest

from dlpipe.refs import SPLITS
from dlpipe.stages.train import pinned_set
from tests.conftest import read_table, stage

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("DLPIPE_DRILL_SEED", "0"))
# the kill point of each step: after progress line 0..K, then 0..D seconds; K and D keep the kill
# inside the step (each prints more lines than K, and runs on for more than D after its K-th)
KILL_POINTS = {"prepare": (3, 2.0), "train": (3, 1.0), "evaluate": (1, 0.3), "score": (1, 2.0), "retrain": (3, 2.0)}


def cli_args(cfg) -> list[str]:
    """`--set` options that give a `dlpipe` process this test config."""
    sets = {
        "paths.landing": cfg.paths.landing, "paths.lake": cfg.paths.lake, "data.name": cfg.data.name,
        "data.classes": json.dumps(list(cfg.data.classes)), "mlflow.tracking_uri": cfg.mlflow.tracking_uri,
        "mlflow.artifact_root": cfg.mlflow.artifact_root, "mlflow.experiment": cfg.mlflow.experiment,
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size, "train.backend": cfg.train.backend,
        "train.checkpoint_uri": cfg.train.checkpoint_uri, "train.run_name": cfg.train.run_name,
        "model.cnn.blocks": json.dumps([dataclasses.asdict(b) for b in cfg.model.cnn.blocks]),
        "model.cnn.hidden": json.dumps(list(cfg.model.cnn.hidden)), "registry.model_name": cfg.registry.model_name,
        "registry.min_accuracy": cfg.registry.min_accuracy, "spark.master": "local[2]",
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def kill_during(step: str, cfg, rng: random.Random, log: Path, *extra: str) -> str:
    """Start `dlpipe <step>`, kill its process group at a seeded point; returns the point, said in words."""
    lines_max, delay_max = KILL_POINTS[step]
    k, delay = rng.randint(0, lines_max), rng.uniform(0, delay_max)
    child = subprocess.Popen([sys.executable, "-m", "dlpipe.cli", step, *cli_args(cfg), *extra],
                             stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    seen = []
    try:
        while len(seen) < k:
            line = child.stdout.readline()
            assert line, f"{step} ended ({child.wait()}) after {len(seen)} progress lines, before line {k}: {seen}"
            if line.startswith(("dlpipe:", "epoch ")):
                seen.append(line.strip())
        time.sleep(delay)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        code = child.wait(timeout=60)
    point = f"{step}: killed {delay:.2f} s after progress line {k}" + (f" ({seen[-1][:90]!r})" if seen else " (the start)")
    print(f"drill seed {SEED}: {point}", flush=True)
    assert code == -signal.SIGKILL, f"{point}, but it had already exited with {code}: the kill point is past its end"
    return point


def check_invariants(cfg, point: str, after_rerun: bool) -> bool:
    """Raises on a broken invariant; returns whether `champion` was there (and loaded)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    lake = Path(cfg.paths.lake)
    for table in sorted(p.parent for p in lake.glob("*/_delta_log")):
        # a table's first write killed before its commit leaves a _delta_log without one: no table, as before
        if deltalake.DeltaTable.is_deltatable(str(table)):
            deltalake.DeltaTable(str(table)).to_pyarrow_table()  # every file of the latest version is there
    if all(deltalake.DeltaTable.is_deltatable(cfg.table_uri(s)) for s in SPLITS):  # a _delta_log without a commit is none
        _, job = pinned_set({s: cfg.table_uri(s) for s in SPLITS})
        assert job, f"{point}: the train/val/test tables are not a complete set of one prepare job"
    client = MlflowClient(cfg.mlflow.tracking_uri)
    name = cfg.registry.model_name
    registered = client.search_registered_models(f"name = '{name}'")  # with its aliases (a version search has none)
    versions = client.search_model_versions(f"name = '{name}'") if registered else []
    for v in versions:
        missing = [t for t in ("dlpipe.run_id", "dlpipe.config_sha256", *(f"dlpipe.table.{s}" for s in SPLITS))
                   if not v.tags.get(t)]
        assert not missing, f"{point}: {name} version {v.version} has no {missing}"
    run_ids = [v.run_id for v in versions]
    assert len(run_ids) == len(set(run_ids)), f"{point}: a training run registered twice: {run_ids}"
    champion = bool(registered) and "champion" in registered[0].aliases
    if champion:
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        mlflow.pyfunc.load_model(f"models:/{name}@champion")
    if after_rerun:
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        running = [r.info.run_id for r in client.search_runs([experiment.experiment_id])
                   if r.info.status == "RUNNING"] if experiment else []
        assert not running, f"{point}, then the rerun: runs left RUNNING: {running}"
    return champion


def test_kill_every_step_at_a_random_point_then_rerun(spark, small_landing, prepared_small, tmp_path):
    base, _ = small_landing
    reference, _ = prepared_small  # a clean prepare of the same files
    cfg = dataclasses.replace(
        base, paths=dataclasses.replace(base.paths, lake=str(tmp_path / "lake")),
        mlflow=dataclasses.replace(base.mlflow, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   artifact_root=str(tmp_path / "mlartifacts"), experiment="drills"),
        train=dataclasses.replace(base.train, backend="local", epochs=4, run_name="drill",
                                  checkpoint_uri=str(tmp_path / "checkpoints")),
        registry=dataclasses.replace(base.registry, model_name="drill_cnn"))
    rng = random.Random(SEED)

    point = kill_during("prepare", cfg, rng, tmp_path / "prepare.log")
    check_invariants(cfg, point, after_rerun=False)
    prepared = stage("prepare", spark, cfg)
    check_invariants(cfg, point, after_rerun=True)
    for split in SPLITS:
        ours, theirs = read_table(prepared, split)["key"], read_table(reference_summary(reference), split)["key"]
        assert sorted(ours) == sorted(theirs), f"{point}, then the rerun: the {split} rows differ from a clean prepare"

    point = kill_during("train", cfg, rng, tmp_path / "train.log")
    check_invariants(cfg, point, after_rerun=False)
    trained = stage("train", spark, cfg)
    check_invariants(cfg, point, after_rerun=True)

    evaluated_cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, run_id=trained["run_id"]))
    point = kill_during("evaluate", evaluated_cfg, rng, tmp_path / "evaluate.log", "--set", f"evaluate.run_id={trained['run_id']}")
    check_invariants(cfg, point, after_rerun=False)
    evaluated = stage("evaluate", spark, evaluated_cfg)
    assert check_invariants(cfg, point, after_rerun=True), "no champion to load after evaluate"
    assert evaluated["champion"], evaluated

    point = kill_during("score", cfg, rng, tmp_path / "score.log", "--set", "score.run_date=2026-12-01")
    check_invariants(cfg, point, after_rerun=False)
    scored_cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, run_date="2026-12-01"))
    scored = stage("score", spark, scored_cfg)
    check_invariants(cfg, point, after_rerun=True)
    predictions = deltalake.DeltaTable(scored["predictions"]["uri"]).to_pandas()
    assert len(predictions) == prepared["tables"]["test"]["rows"] and predictions["key"].is_unique

    newer = stage("prepare", spark, cfg)  # new table versions: retrain has something to do
    point = kill_during("retrain", cfg, rng, tmp_path / "retrain.log")
    check_invariants(cfg, point, after_rerun=False)
    stage("retrain", spark, cfg)
    assert check_invariants(cfg, point, after_rerun=True), "no champion to load after retrain"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    decided = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    on_newest = [v for v in decided if v.tags.get("dlpipe.table.train") == f"{newer['tables']['train']['uri']}@{newer['tables']['train']['version']}"]
    assert len(on_newest) == 1 and on_newest[0].tags.get("dlpipe.retrain.outcome"), [v.tags for v in decided]


def reference_summary(cfg):
    """The clean prepare's summary, as the reference's tables stand (their latest versions)."""
    return {"tables": {s: {"uri": cfg.table_uri(s), "version": deltalake.DeltaTable(cfg.table_uri(s)).version()} for s in SPLITS}}
