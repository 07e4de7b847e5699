"""The MLflow tracking server goes away while `dlpipe train` runs: a real `mlflow server` on
127.0.0.1, killed (SIGKILL, its whole process group) as rank 0 writes its first checkpoint, and
started again on the same port and store. Every epoch's metrics end up in the run once, and the run
ends FINISHED or FAILED, never RUNNING."""

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from dlpipe import outbox
from tests.conftest import MlflowServer, mlflow_store, stage


@pytest.fixture
def server(tmp_path):
    (tmp_path / "server").mkdir()
    running = MlflowServer(tmp_path / "server")
    running.start()
    yield running
    running.kill()


def outage(server: MlflowServer, checkpoints: Path, back_after_s: float | None) -> threading.Thread:
    """Kill the server as the first checkpoint appears; start it again `back_after_s` later (None: not)."""

    def watch():
        deadline = time.time() + 300
        while not any(checkpoints.rglob("epoch-*.pt")) and time.time() < deadline:
            time.sleep(0.02)
        server.kill()
        if back_after_s is not None:
            time.sleep(back_after_s)
            server.start()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run_config(prepared_small, tmp_path, server, **train):
    cfg, _ = prepared_small
    return dataclasses.replace(
        cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=server.uri, experiment="outage"),
        train=dataclasses.replace(cfg.train, epochs=6, checkpoint_uri=str(tmp_path / "checkpoints"), **train))


def epochs_logged(client, run_id, key="val_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_short_outage_mid_training_on_two_horovod_workers_loses_nothing(spark, prepared_small, server, tmp_path):
    """Down about 5 s from the first checkpoint on: MLflow's own retries and the rank-0 sender ride it out."""
    from mlflow.tracking import MlflowClient

    cfg = run_config(prepared_small, tmp_path, server, backend="horovod", num_workers=2, run_name="outage_short")
    watcher = outage(server, tmp_path / "checkpoints", back_after_s=5)
    summary = stage("train", spark, cfg)
    watcher.join(timeout=120)
    assert server.proc.poll() is None, "the server was not started again: the outage did not happen during the run"
    client = MlflowClient(server.uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, summary["run_id"]) == [1, 2, 3, 4, 5, 6]
    assert "dlpipe.model_uri" in run.data.tags


@pytest.mark.slow
def test_a_long_outage_fails_the_step_in_one_line_and_the_next_train_finishes_the_same_run(
        spark, prepared_small, server, tmp_path, monkeypatch):
    """Down from the first checkpoint to the end: training goes on, the step stops with exit 5 and
    keeps the run's end and its undelivered epochs in the outbox; the server back, the next
    `dlpipe train` delivers them (the run FAILED, not RUNNING) and resumes that run from its last
    checkpoint to FINISHED without training an epoch again."""
    from mlflow.tracking import MlflowClient

    from dlpipe.errors import EXIT_TRACKING, TrackingUnreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # give up at once (default: about 4 minutes)
    cfg = run_config(prepared_small, tmp_path, server, backend="local", run_name="outage_long")
    watcher = outage(server, tmp_path / "checkpoints", back_after_s=None)
    with pytest.raises(TrackingUnreachable) as failed:
        stage("train", spark, cfg)
    watcher.join(timeout=60)
    message = str(failed.value)
    assert failed.value.exit_code == EXIT_TRACKING and "\n" not in message
    run_id = next(p.name for p in (tmp_path / "checkpoints" / "outage_long").iterdir())
    kept = tmp_path / "checkpoints" / "outbox" / f"{run_id}.json"
    assert run_id in message and str(kept) in message
    entry = json.loads(kept.read_text())
    assert entry["status"] == "FAILED" and entry["records"], entry
    assert len(list((tmp_path / "checkpoints" / "outage_long" / run_id).glob("epoch-*.pt"))) == 6  # trained to the end

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what the server last heard
    resumed = stage("train", spark, cfg)
    assert not kept.exists()
    assert resumed["run_id"] == run_id and resumed["resumed_from"].endswith("epoch-0006.pt")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "dlpipe.model_uri" in run.data.tags
    assert epochs_logged(client, run_id) == [1, 2, 3, 4, 5, 6]  # each once: the outbox's, and any sent before the kill


def test_the_outbox_is_delivered_to_its_own_store_only_and_never_ends_a_finished_run(tmp_path):
    """deliver(): records in order, then the kept status only over RUNNING; entries of another store stay."""
    from mlflow.tracking import MlflowClient

    store = mlflow_store(tmp_path)
    client = MlflowClient(store)
    experiment = client.create_experiment("outbox")
    running, finished = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(finished, "FINISHED")
    box = str(tmp_path / "outbox")
    for run_id in (running, finished):
        outbox.defer(box, store, run_id, "FAILED", [outbox.metric("loss", 0.5, 1), outbox.text("hi", "samples/a.txt"),
                                                    outbox.metric("loss", 0.25, 2)])
    outbox.defer(box, "sqlite:///elsewhere.db", "other", "FAILED", [])
    assert sorted(outbox.deliver(box, store, log=lambda _: None)) == sorted([running, finished])
    assert client.get_run(running).info.status == "FAILED" and client.get_run(finished).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(running, "loss")] == [(1, 0.5), (2, 0.25)]
    assert [f.path for f in client.list_artifacts(running, "samples")] == ["samples/a.txt"]
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["other.json"]


def test_unreachable_tells_a_server_that_did_not_answer_from_one_that_refused():
    import requests
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise requests.exceptions.ConnectionError("HTTPConnectionPool: Max retries exceeded")
        except requests.exceptions.ConnectionError as exc:
            raise MlflowException(f"API request failed with exception {exc}") from None
    except MlflowException as wrapped:
        assert outbox.unreachable(wrapped)
    assert not outbox.unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'x' not found"))
