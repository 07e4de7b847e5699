"""A step launched through the real spark-submit that ships with pyspark, on local[2]."""

import json
import os
import subprocess
import sys
from pathlib import Path

import deltalake
import pytest

from dlpipe import lake
from dlpipe.config import load_config

pytestmark = pytest.mark.slow


def test_prepare_through_spark_submit(small_landing, tmp_path):
    cfg, _ = small_landing
    spark_submit = Path(sys.executable).parent / "spark-submit"
    summary = tmp_path / "prepare.json"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    proc = subprocess.run(
        [str(spark_submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false", "jobs/prepare.py",
         "--conf", "conf/fashion_cnn.yaml", "--set", f"paths.landing={cfg.paths.landing}",
         "--set", f"paths.lake={tmp_path}/lake", "--set", f"data.name={cfg.data.name}",
         "--set", f"data.classes={json.dumps(cfg.data.classes)}", "--summary", str(summary)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    produced = json.loads(summary.read_text())
    assert produced["step"] == "prepare" and produced["input_files"] == 300
    for split in ("train", "val", "test"):
        table = produced["tables"][split]
        assert table["uri"] == f"{tmp_path}/lake/{cfg.data.name}_{split}"
        assert deltalake.DeltaTable(table["uri"]).to_pyarrow_table().num_rows == table["rows"]
    # spark-submit's --master won over the config's local[*]
    assert produced["spark_master"] == "local[2]"
    assert {h["engine"] for h in lake.history(produced["tables"]["train"]["uri"])} == {"rs"}  # no --jars given


def test_spark_submit_with_the_jars_writes_through_delta_spark(small_landing, tmp_path):
    """What a cluster user does: the jars of .work/jars on --jars; dlpipe turns Delta's extension on."""
    cfg, _ = small_landing
    jars = ",".join(str(p) for p in sorted(Path(load_config().spark.jars_dir).glob("*.jar")))
    summary = tmp_path / "prepare.json"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--jars", jars,
         "--conf", "spark.ui.enabled=false", "jobs/prepare.py", "--conf", "conf/fashion_cnn.yaml",
         "--set", f"paths.landing={cfg.paths.landing}", "--set", f"paths.lake={tmp_path}/lake",
         "--set", f"data.classes={json.dumps(cfg.data.classes)}", "--set", "lake.engine=spark",
         "--summary", str(summary)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    produced = json.loads(summary.read_text())
    for table in produced["tables"].values():
        assert {h["engine"] for h in lake.history(table["uri"])} == {"spark"}, table["uri"]
