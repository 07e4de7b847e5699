import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from dl.train import TrainConfig
from dlpipe.launchers import TrainTask, launch
from tests.conftest import mlflow_store
from tests.test_train import _blobs, tiny_net


def _task(tmp_path, files_per_split=3, rows=600):
    """Blob images as parquet files shaped like a prepared image table, and a real MLflow run."""
    files = {}
    for split, seed in (("train", 1), ("val", 2)):
        x, y = _blobs(rows if split == "train" else rows // 4, seed)
        files[split] = []
        for f, idx in enumerate(np.array_split(np.arange(len(y)), files_per_split)):
            table = pa.table({"label": pa.array(y[idx], pa.int32()),
                              "pixels": pa.array(list(x[idx].reshape(len(idx), -1)), pa.list_(pa.float32()))})
            path = tmp_path / f"{split}-{f}.parquet"
            pq.write_table(table, path)
            files[split].append(f"file://{path}")
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("launch", artifact_location=(tmp_path / "art").as_uri()))
    return TrainTask(net=tiny_net(in_channels=1, image_size=12, num_classes=2, conv_channels=(4,), hidden=16, dropout=0.0),
        train=TrainConfig(epochs=3, batch_size=16, lr=0.01, seed=3), train_files=files["train"], val_files=files["val"],
        tracking_uri=uri, run_id=run.info.run_id, threads=1,
    ), client


def test_local_backend_trains_and_logs_every_epoch(tmp_path):
    task, client = _task(tmp_path)
    result = launch(None, task, "local", 1)
    assert result["world_size"] == 1 and result["train_rows"] == 600
    assert result["history"][-1]["val_accuracy"] > 0.9
    assert [m.step for m in client.get_metric_history(task.run_id, "val_accuracy")] == [1, 2, 3]


def test_missing_horovod_is_an_error_naming_the_key_not_a_fallback(tmp_path, monkeypatch):
    task, _ = _task(tmp_path)
    monkeypatch.setitem(sys.modules, "horovod", None)  # `import horovod...` raises ImportError
    monkeypatch.setitem(sys.modules, "horovod.spark", None)
    with pytest.raises(ValueError, match=r"config key 'train.backend': horovod, but Horovod is not importable .*"
                                         r"install_horovod.sh"):
        launch(None, task, "horovod", 2)


def test_missing_horovod_fails_the_command_in_one_line_before_spark_starts(tmp_path):
    hidden = tmp_path / "hide" / "horovod"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named horovod (hidden by the test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "dlpipe.cli", "train", "--set", "train.backend=horovod",
                           "--set", f"paths.lake={tmp_path}/lake", "--set", f"mlflow.tracking_uri={mlflow_store(tmp_path, 'm.db')}"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()  # nothing else: Spark never started
    assert line.startswith("dlpipe: config error: config key 'train.backend': horovod, but Horovod is not importable")


@pytest.mark.slow
def test_two_horovod_workers_on_spark(spark, tmp_path, capfd):
    import horovod.torch  # noqa: F401  (`make test` installs Horovod; a missing one must fail, not skip)
    task, client = _task(tmp_path, files_per_split=3, rows=601)  # uneven shards: 3 files over 2 workers
    result = launch(spark, task, "horovod", 2)
    assert result["world_size"] == 2
    assert result["train_rows"] == 601  # every row of the snapshot, read by exactly one worker
    history = result["history"]
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["val_accuracy"] > 0.9
    # metrics are logged once per epoch, by the main rank only
    assert [m.step for m in client.get_metric_history(task.run_id, "loss")] == [1, 2, 3]


@pytest.mark.slow
def test_too_many_workers_is_a_clear_error(spark, tmp_path):
    import horovod.torch  # noqa: F401  (`make test` installs Horovod; a missing one must fail, not skip)
    task, _ = _task(tmp_path)
    with pytest.raises(RuntimeError, match="needs 8 concurrent Spark task slots; this Spark application has 2"):
        launch(spark, task, "horovod", 8)
