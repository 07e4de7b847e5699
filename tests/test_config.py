import subprocess
import sys

import pytest

from dlpipe.config import ConfigError, load_config


def test_base_config_loads_and_resolves_paths(tmp_path):
    cfg = load_config("conf/fashion_cnn.yaml")
    assert cfg.train.backend == "horovod"
    assert cfg.paths.lake.startswith("/")  # relative paths become absolute for executors
    assert cfg.mlflow.tracking_uri.startswith("sqlite:////")


def test_set_overrides_file_and_base():
    cfg = load_config("conf/fashion_cnn.yaml", ["train.lr=0.01", "model.cnn.hidden=[8, 16]", "train.epochs=1"])
    assert cfg.train.lr == 0.01 and cfg.model.cnn.hidden == [8, 16] and cfg.train.epochs == 1


def test_set_spark_conf_key_with_dots():
    cfg = load_config(None, ["spark.conf.spark.ui.enabled=false", "spark.conf.spark.executor.memory=2g"])
    assert cfg.spark.conf["spark.ui.enabled"] == "false" and cfg.spark.conf["spark.executor.memory"] == "2g"
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == "8"  # merged with the defaults, not replaced


def test_int_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'"),
        ("trian.lr=0.1", "unknown config key 'trian'"),
        ("train.lr=fast", "config key 'train.lr': expected a number, got 'fast'"),
        ("train.epochs=2.5", "config key 'train.epochs': expected an integer, got 2.5"),
        ("train.backend=mpi", "config key 'train.backend': expected one of ['horovod', 'torch_distributor', 'local'], got 'mpi'"),
        ("train.use_gpu=maybe", "config key 'train.use_gpu': expected one of ['auto', True, False], got 'maybe'"),
        ("train.warmup_epochs=10", "config key 'train.warmup_epochs': expected fewer than train.epochs=6"),
        ("model.cnn.hidden=[8, x]", "config key 'model.cnn.hidden[1]': expected an integer, got 'x'"),
        ("data.split_fractions={train: 0.9, val: 0.2, test: 0.1}", "config key 'data.split_fractions'"),
        ("model.cnn.dropout=1.5", "config key 'model.cnn.dropout': expected a number in [0, 1)"),
        ("train.lr", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_config_error_exits_2_with_one_line_before_spark(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", "train", "--conf", "conf/fashion_cnn.yaml", "--set", "train.batch_size=big"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["dlpipe: config error: config key 'train.batch_size': expected an integer, got 'big'"]


def test_mnist_fallback_file_matches_what_the_demo_switches_to(monkeypatch):
    from dlpipe import demo_data
    from dlpipe.stages import land

    monkeypatch.setattr(demo_data, "available_dataset", lambda: demo_data.MNIST_5K)
    fashion, mnist = load_config("conf/fashion_cnn.yaml"), load_config("conf/mnist_5k_cnn.yaml")
    data, paths, dataset = land.demo_sections(fashion.data, fashion.paths)
    assert dataset == demo_data.MNIST_5K
    assert (data, paths) == (mnist.data, mnist.paths) and fashion.train == mnist.train
