"""The registry module on a real SQLite-backed MLflow registry: the promotion lock, alias moves
(promote, rollback), the decision rule, and the score job's one-commit slice replacement."""

import datetime
import threading
import time

import deltalake
import pytest
from mlflow.tracking import MlflowClient

from dlpipe import lake, registry
from dlpipe.config import ConfigError
from tests.conftest import make_config, mlflow_store


@pytest.fixture()
def client(tmp_path):
    return MlflowClient(mlflow_store(tmp_path))


def make_versions(client, tmp_path, name, n):
    client.create_registered_model(name)
    source = tmp_path / "model"
    source.mkdir(exist_ok=True)
    return [client.create_model_version(name, str(source)).version for _ in range(n)]


def test_beats_respects_direction_and_min_improvement():
    assert registry.beats("test_accuracy", 0.80, 0.70, 0.05)[0]
    assert not registry.beats("test_accuracy", 0.74, 0.70, 0.05)[0]
    assert not registry.beats("test_accuracy", 0.70, 0.70, 0.0)[0]  # a tie never promotes
    assert registry.beats("test_log_loss", 0.30, 0.50, 0.1)[0]
    wins, why = registry.beats("test_log_loss", 0.60, 0.50, 0.0)
    assert not wins and "lower is better" in why and "below registry.min_improvement" in why


def test_lock_excludes_a_second_holder_and_is_released(client):
    with registry.lock(client, "m", ttl_s=60, wait_s=1) as owner:
        assert client.get_registered_model("m.lock").tags["owner"] == owner
        with pytest.raises(TimeoutError, match=f"m.lock is held by {owner}"):
            with registry.lock(client, "m", ttl_s=60, wait_s=1):
                pass
    assert registry._lock_tags(client, "m.lock") is None


def test_waiting_job_gets_the_lock_after_release(client):
    order = []

    def second():
        with registry.lock(client, "m", ttl_s=60, wait_s=30):
            order.append("second")

    with registry.lock(client, "m", ttl_s=60, wait_s=1):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.5)
        order.append("first done")
    thread.join(timeout=30)
    assert order == ["first done", "second"]


def test_stale_lock_of_a_crashed_job_is_broken(client):
    client.create_registered_model("m.lock", tags={"owner": "crashed:1:x", "expires_at": f"{time.time() - 5:.3f}"})
    with registry.lock(client, "m", ttl_s=60, wait_s=1) as owner:
        assert client.get_registered_model("m.lock").tags["owner"] == owner != "crashed:1:x"


def test_the_lock_of_a_killed_process_on_this_machine_is_broken_at_once(client):
    """Its holder killed (SIGKILL) inside the lock: taken at once, not after lock_ttl_s; a live holder is waited for."""
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mlflow.tracking import MlflowClient; "
                               "from dlpipe import registry; "
                               "ctx = registry.lock(MlflowClient(sys.argv[1]), 'm', ttl_s=3600, wait_s=1); ctx.__enter__(); "
                               "print('held', flush=True); time.sleep(600)", client.tracking_uri],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TimeoutError, match="m.lock is held by"):  # alive: waited for
        with registry.lock(client, "m", ttl_s=60, wait_s=1):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with registry.lock(client, "m", ttl_s=60, wait_s=30) as owner:  # its lock would hold for an hour
        assert client.get_registered_model("m.lock").tags["owner"] == owner
    assert not registry._gone("otherhost|pid:[1]|1|1") and not registry._gone("")  # elsewhere, unknown: waited for


def test_promote_and_rollback_move_aliases(client, tmp_path):
    v1, v2, v3 = make_versions(client, tmp_path, "m", 3)
    assert registry.promote(client, "m", v1) is None
    registry.set_aliases(client, "m", [("challenger", v2)])
    assert registry.promote(client, "m", v2) == str(v1)
    assert registry.promote(client, "m", v3) == str(v2)
    aliases = client.get_registered_model("m").aliases
    assert aliases == {"champion": v3, "previous": v2}  # the promoted challenger lost its alias
    assert client.get_model_version("m", v3).tags["dlpipe.replaced"] == str(v2)

    out = registry.rollback(client, "m", 60, 5)
    assert client.get_registered_model("m").aliases == {"champion": v2, "previous": v1, "rolled_back": v3}
    assert out == {"step": "models rollback", "model_name": "m", "champion": 2, "rolled_back": 3, "previous": 1}
    assert "dlpipe.rolled_back_at" in client.get_model_version("m", v3).tags
    registry.rollback(client, "m", 60, 5)
    assert client.get_registered_model("m").aliases == {"champion": v1, "rolled_back": v2}
    with pytest.raises(LookupError, match="no previous version"):
        registry.rollback(client, "m", 60, 5)
    assert registry._lock_tags(client, "m.lock") is None


def test_failed_alias_move_says_what_is_left(client, tmp_path):
    (v1,) = make_versions(client, tmp_path, "m", 1)
    with pytest.raises(RuntimeError, match=r"failed at previous->99 .*applied: champion->1; not applied: previous->99"):
        registry.set_aliases(client, "m", [("champion", v1), ("previous", "99")])


def test_describe_unknown_model_is_a_clear_error(client):
    with pytest.raises(LookupError, match="no registered model named 'nope'"):
        registry.describe(client, "nope")


def test_models_cli_unknown_model_exits_1(tmp_path, capsys):
    from dlpipe.cli import main

    rc = main(["models", "describe", "nope", "--set", f"mlflow.tracking_uri={mlflow_store(tmp_path, 'm.db')}"])
    assert rc == 1 and "no registered model named 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [("registry.min_improvement=-0.1", "registry.min_improvement"),
                                           ("registry.metric=f1", "registry.metric"),
                                           ("registry.lock_ttl_s=0", "registry.lock_ttl_s"),
                                           ("score.run_date=yesterday", "score.run_date")])
def test_registry_and_score_config_are_validated(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        make_config(tmp_path, override)


def test_replace_where_replaces_one_slice_in_one_commit(spark, tmp_path):
    uri = str(tmp_path / "predictions")
    day = datetime.date(2026, 1, 2)

    def frame(version, keys):
        return spark.createDataFrame([(k, version, day) for k in keys], "key string, model_version int, run_date date")

    assert lake.replace_where(frame(1, ["a", "b"]), uri, {"model_version": 1, "run_date": day}) == 0
    assert lake.replace_where(frame(2, ["a"]), uri, {"model_version": 2, "run_date": day}) == 1
    assert lake.replace_where(frame(1, ["a", "b", "c"]), uri, {"model_version": 1, "run_date": day}) == 2
    rows = deltalake.DeltaTable(uri).to_pandas()
    assert sorted(rows[rows.model_version == 1]["key"]) == ["a", "b", "c"]  # replaced, not duplicated
    assert list(rows[rows.model_version == 2]["key"]) == ["a"]  # other slices untouched
    assert deltalake.DeltaTable(uri, version=1).to_pandas().shape[0] == 3  # the previous version stays readable
