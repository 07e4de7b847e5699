"""Expected failures through the real `dlpipe` command (a subprocess with its own Spark): one
line on stderr, `dlpipe: error: ...`, no traceback, and the exit code dlpipe.errors documents."""

import socket
import subprocess
import sys

from PIL import Image

from dlpipe import errors
from tests.conftest import mlflow_store


def _dlpipe(tmp_path, *args):
    """`dlpipe <command> <settings under tmp_path> <args>`: the later --set wins."""
    command, rest = args[0], list(args[1:])
    common = ["--set", f"paths.lake={tmp_path}/lake", "--set", f"mlflow.tracking_uri={mlflow_store(tmp_path)}",
              "--set", f"mlflow.artifact_root={tmp_path}/mlartifacts", "--set", "spark.master=local[1]",
              "--set", "spark.conf.spark.ui.enabled=false"]
    proc = subprocess.run([sys.executable, "-m", "dlpipe.cli", command, *common, *rest], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("dlpipe: error")]
    return proc, ours


def _assert_one_line(proc, ours, code, text):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(ours) == 1 and text in ours[0], ours


def test_data_quality_stop_of_prepare(tmp_path):
    landing = tmp_path / "landing"
    for i in range(4):
        (landing / "cat").mkdir(parents=True, exist_ok=True)
        (landing / "cat" / f"bad_{i}.png").write_bytes(b"not an image")
    Image.new("L", (6, 6)).save(landing / "cat" / "good.png")
    proc, ours = _dlpipe(tmp_path, "prepare", "--set", f"paths.landing={landing}", "--set", "data.classes=[cat, dog]",
                         "--set", "data.max_rejected_fraction=0.1")
    _assert_one_line(proc, ours, errors.EXIT_DATA_QUALITY, "4 of 5 files")


def test_missing_table(tmp_path):
    proc, ours = _dlpipe(tmp_path, "train", "--set", "train.backend=local")
    _assert_one_line(proc, ours, errors.EXIT_MISSING_INPUT, f"no Delta table at {tmp_path}/lake/")


def test_unreachable_tracking_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    proc, ours = _dlpipe(tmp_path, "evaluate", "--set", f"mlflow.tracking_uri=http://127.0.0.1:{port}")
    _assert_one_line(proc, ours, errors.EXIT_TRACKING, f"MLflow tracking server http://127.0.0.1:{port} is unreachable")


def test_bench_runs_from_the_checkout_and_names_a_missing_table(tmp_path):
    """`dlpipe bench` finds benchmarks/ (not installed) in the checkout; without tables it says so."""
    proc, ours = _dlpipe(tmp_path, "bench", "training", "--set", "train.backend=local")
    _assert_one_line(proc, ours, errors.EXIT_MISSING_INPUT, "run `dlpipe prepare` first")
