import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hdfs.cluster import hdfs  # noqa: F401  (the session fixture: a real HDFS on 127.0.0.1)

os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
SHORT_JVM = {}  # the PYSPARK_SUBMIT_ARGS set for the `dlpipe` processes the tests start (tests/jvm.py)


def pytest_sessionstart(session):
    inherited = os.environ.get("DLPIPE_TESTS_SHORT_JVM")  # a pytest-xdist worker: its controller chose them
    if inherited:
        SHORT_JVM["args"] = inherited
    elif "PYSPARK_SUBMIT_ARGS" not in os.environ:
        from tests import jvm

        SHORT_JVM["args"] = os.environ["PYSPARK_SUBMIT_ARGS"] = os.environ["DLPIPE_TESTS_SHORT_JVM"] = jvm.submit_args()


@pytest.fixture(scope="session")
def spark():
    """One local Spark per test run (start-up costs ~15 s on 2 cores), with dlpipe's default Spark conf."""
    from dlpipe.config import load_config
    from dlpipe.spark import get_session

    cfg = load_config()
    short = SHORT_JVM.get("args")  # this JVM lives the whole run: C2, no archive
    if short:
        os.environ["PYSPARK_SUBMIT_ARGS"] = "pyspark-shell"
    session = get_session(
        "local[2]",
        "dlpipe-tests",
        {**cfg.spark.conf, "spark.sql.shuffle.partitions": "4", "spark.ui.enabled": "false", "spark.driver.memory": "2g"},
        jars_dir=cfg.spark.jars_dir, engine="spark",  # `make test` fetched the delta-spark jars
    )
    if short:
        os.environ["PYSPARK_SUBMIT_ARGS"] = short
    yield session
    session.stop()


def stage(name, spark, cfg, **args):
    """The stage behind `dlpipe <name>` with this config, in this process: the CLI's own table
    (dlpipe.cli.COMMANDS) picks the config sections it takes. `args` are the command's options."""
    from argparse import Namespace

    from dlpipe.cli import COMMANDS

    return COMMANDS[name].run(spark, cfg, Namespace(**args))


def with_run(cfg, run_id):
    """cfg with evaluate.run_id set (evaluate that training run)."""
    import dataclasses

    return dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, run_id=run_id))


# the start of a consumer script: a Python where dlpipe, dl and pipelines cannot be imported
WITHOUT_DLPIPE = """
import importlib.abc, json, sys
class NoDlpipe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"dlpipe", "dl", "pipelines"}:
            raise ImportError(f"{name} is not importable for a consumer")
sys.meta_path.insert(0, NoDlpipe())
"""


def read_table(summary, suffix):
    """The table a prepare summary names, at the version it wrote, as pandas (delta-rs, no Spark),
    its tensor columns unpacked to float arrays (dlpipe.tensors)."""
    import deltalake

    from dlpipe import tensors

    table = summary["tables"][suffix]
    arrow = deltalake.DeltaTable(table["uri"], version=table["version"]).to_pyarrow_table()
    for name in set(tensors.STORED) & set(arrow.column_names):
        arrow = arrow.set_column(arrow.column_names.index(name), name, tensors.unpack(arrow.column(name), name))
    return arrow.to_pandas()


def split_rows(summary):
    """Every row of a prepare summary's train/val/test tables, with a `split` column."""
    import pandas as pd

    return pd.concat([read_table(summary, s).assign(split=s) for s in ("train", "val", "test")], ignore_index=True)


def mlflow_store(root, name: str = "mlflow.db") -> str:
    """sqlite:///<root>/<name>: a new store is a copy of one whose schema was migrated once per MLflow
    version (.work/mlflow/), since migrating a fresh SQLite store costs 3-5 s and the suite makes dozens."""
    import shutil

    import mlflow

    db = Path(root) / name
    if not db.exists():
        template = Path(__file__).resolve().parents[1] / ".work" / "mlflow" / f"store-{mlflow.__version__}.db"
        if not template.exists():
            from mlflow.tracking import MlflowClient

            template.parent.mkdir(parents=True, exist_ok=True)
            fresh = template.with_suffix(f".{os.getpid()}.tmp")
            MlflowClient(f"sqlite:///{fresh.resolve()}").search_experiments()  # creates and migrates it
            fresh.replace(template)
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def make_config(root, *overrides, conf=None):
    """A config whose every output lives under `root` (a tmp dir)."""
    from dlpipe.config import load_config

    return load_config(conf, [
        f"paths.landing={root}/landing/fashion_mnist",
        f"paths.lake={root}/lake",
        f"mlflow.tracking_uri={mlflow_store(root)}",
        f"mlflow.artifact_root={root}/mlartifacts",
        *overrides,
    ])


@pytest.fixture(scope="session")
def small_landing(tmp_path_factory):
    """A small real slice of the demo data (30 images per class), landed as PNG files, and a
    config for it with a small, fast model: (config, land summary)."""
    import json

    from dlpipe.stages import land

    root = tmp_path_factory.mktemp("small")
    cfg = make_config(root, "data.land_limit_per_class=30")
    data, paths, _ = land.demo_sections(cfg.data, cfg.paths)
    landed = land.run_demo(data, paths)
    cfg = make_config(
        root, f"paths.landing={paths.landing}", f"data.name={data.name}",
        f"data.classes={json.dumps(data.classes)}", "train.epochs=3", "train.batch_size=16",
        "model.cnn.blocks=[{channels: 8}, {channels: 16}]", "model.cnn.hidden=[32]", "registry.min_accuracy=0.3",
        "registry.model_name=e2e_cnn", f"train.checkpoint_uri={root}/checkpoints",
    )
    return cfg, landed


@pytest.fixture(scope="session")
def prepared_small(spark, small_landing):
    """The small slice prepared into Delta tables once per test run: (config, prepare summary)."""
    cfg, _ = small_landing
    return cfg, stage("prepare", spark, cfg)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend store, artifacts served by the server
    from a local directory) on a free port that stays its own: start it, kill it (SIGKILL, its
    whole process group) and start it again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.store = root, mlflow_store(root)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        import urllib.request

        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.store, "--artifacts-destination", str(self.root / "artifacts"),
             "--serve-artifacts", "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
            self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` for the whole test run: yields its http:// URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server.uri
    server.kill()


@pytest.fixture(scope="session")
def registered_small(spark, prepared_small):
    """A small CNN trained in one local process on the prepared slice, evaluated and registered
    as `small_cnn` (alias champion): (config, evaluate summary). For heatmaps, similarity, transfer."""
    import dataclasses

    cfg, _ = prepared_small
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, backend="local", run_name="small_cnn", epochs=4),
        registry=dataclasses.replace(cfg.registry, model_name="small_cnn", min_accuracy=0.0))
    trained = stage("train", spark, cfg)
    return cfg, stage("evaluate", spark, with_run(cfg, trained["run_id"]))


@contextlib.contextmanager
def moto_server(**env):
    """A real S3-compatible server (moto) on a free 127.0.0.1 port: yields its endpoint URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("moto_server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
