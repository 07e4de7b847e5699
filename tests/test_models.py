"""The model registry: every registered model builds for its inputs, validates its config naming
the key, and trains through the distributed loop on a tiny real sample with a falling loss."""

import dataclasses

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from dl.models import REGISTRY, TASKS, CNNConfig, ConvBlock, MLPConfig, Net, build
from dl.train import TrainConfig, metric_name
from dlpipe import lake, modeling
from dlpipe.config import ConfigError, load_config
from dlpipe.launchers import TrainTask, launch
from tests.conftest import mlflow_store, stage, with_run


def test_registry_finds_every_model_file_with_its_tasks_and_inputs():
    assert {"cnn", "mlp", "autoencoder", "som", "rnn"} <= set(REGISTRY)
    assert REGISTRY["cnn"].inputs == ("image",) and "table" in REGISTRY["mlp"].inputs
    assert REGISTRY["autoencoder"].tasks == ("reconstruction",) and REGISTRY["som"].tasks == ("clustering",)
    for spec in REGISTRY.values():
        assert set(spec.tasks) <= set(TASKS) and dataclasses.is_dataclass(spec.config)


def test_cnn_blocks_any_channels_and_size():
    params = CNNConfig(blocks=[ConvBlock(channels=6, kernel_size=5, stride=2, pool="none"),
                               ConvBlock(channels=8, padding="valid", pool="avg", batch_norm=False, dropout=0.1)],
                       hidden=[32, 16], activation="tanh")
    model = build(Net(name="cnn", params=params, input_shape=(3, 21, 17), num_outputs=7, task="classification"))
    assert model(torch.zeros(4, 3, 21, 17)).shape == (4, 7)
    assert model.features(torch.zeros(4, 3, 21, 17)).shape == (4, 16)  # the embedding: last hidden layer
    assert isinstance(model.head[-1], torch.nn.Linear)
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in model.modules())
    with pytest.raises(ValueError, match=r"blocks\[1\] shrinks a 6x6 image"):
        build(Net(name="cnn", params=CNNConfig(blocks=[ConvBlock(channels=4), ConvBlock(channels=4, padding="valid", kernel_size=3)]),
                  input_shape=(1, 6, 6), num_outputs=2, task="classification"))


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_mlp_shapes_for_tables_and_images(act):
    reg = build(Net(name="mlp", params=MLPConfig(hidden=[8, 4], activation=act, batch_norm=True), input_shape=(13,),
                    num_outputs=1, task="regression"))
    assert reg(torch.zeros(5, 13)).shape == (5, 1)
    clf = build(Net(name="mlp", params=MLPConfig(hidden=[8], activation=act), input_shape=(1, 28, 28), num_outputs=10,
                    task="classification"))
    assert clf(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize("override, message", [
    ("model.name=transformer", "config key 'model.name': expected one of ['autoencoder', 'autorec', 'cnn', 'dbn', 'mlp', 'rbm', 'rbm_cf', 'rnn', 'rntn', 'som', 'word2vec'], got 'transformer'"),
    ("model.task=ranking", "config key 'model.task': expected one of ['classification', 'regression', 'reconstruction'"),
    ("model.task=reconstruction", "config key 'model.task': model cnn supports ['classification', 'regression']"),
    ("model.autoencoder.kind=variational", "config key 'model.autoencoder.kind': expected one of ['deep', 'denoising'"),
    ("model.autoencoder.sparsity=1.5", "config key 'model.autoencoder.sparsity': expected a number in (0, 1), got 1.5"),
    ("model.som.topology=toroidal", "config key 'model.som.topology': expected one of ['rectangular', 'hexagonal']"),
    ("model.som.rate=0", "config key 'model.som.rate': expected a positive number, got 0"),
    ("train.pretrain=greedy", "config key 'train.pretrain': greedy pretraining needs a model with layers to pretrain "
                              "(autoencoder, dbn), got model.name=cnn"),
    ("model.cnn.blocks=[{channels: 8, padding: full}]", "config key 'model.cnn.blocks[0].padding': expected one of ['same', 'valid']"),
    ("model.cnn.blocks=[{chanels: 8}]", "unknown config key 'model.cnn.blocks[0].chanels'"),
    ("model.cnn.blocks=[{channels: 8, stride: 0}]", "config key 'model.cnn.blocks[0].stride': expected positive integers"),
    ("model.cnn.blocks=[]", "config key 'model.cnn.blocks': expected at least one convolution block"),
    ("model.mlp.activation=gelu", "config key 'model.mlp.activation': expected one of ['relu', 'sigmoid', 'tanh'], got 'gelu'"),
    ("model.mlp.dropout=1", "config key 'model.mlp.dropout': expected a number in [0, 1), got 1"),
    ("model.mlp.hidden=[64, -1]", "config key 'model.mlp.hidden': expected positive integers"),
    ("train.freeze=features", "config key 'train.freeze': freezing needs pretrained weights"),
    ("train.init_from=runs:/x/model", "config key 'train.init_from': expected models:/<name>@<alias>"),
    ("data.select_classes=[trouser, robot]", "config key 'data.select_classes'"),
    ("data.label_fraction=0", "config key 'data.label_fraction': expected a number in (0, 1]"),
])
def test_bad_model_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("conf/fashion_cnn.yaml", [override])
    assert message in str(err.value)


def test_partial_block_takes_the_block_defaults():
    cfg = load_config(None, ["model.name=cnn", "model.cnn.blocks=[{channels: 8}, {channels: 16, pool: avg}]"])
    assert cfg.model.cnn.blocks[1] == ConvBlock(channels=16, pool="avg")


def _task(cfg, tables, net, epochs=4, **extra) -> TrainTask:
    return TrainTask(net=net, train=TrainConfig(epochs=epochs, batch_size=16, lr=0.003, seed=1),
                     train_files=lake.table_files(*tables["train"]), val_files=lake.table_files(*tables["val"]),
                     tracking_uri=cfg.mlflow.tracking_uri, threads=1, **extra)


@pytest.mark.parametrize("name", sorted(n for n, spec in REGISTRY.items() if "image" in spec.inputs))  # rnn: test_rnn.py
def test_each_model_trains_on_real_images_and_its_loss_falls(spark, prepared_small, name):
    cfg, prepared = prepared_small
    tables = {s: (t["uri"], t["version"]) for s, t in prepared["tables"].items()}
    task = REGISTRY[name].tasks[0]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name, task=task))
    result = launch(spark, _task(cfg, tables, modeling.image_net(cfg.model, cfg.data)), "local", 1)
    history = result["history"]
    assert history[-1]["loss"] < history[0]["loss"] and metric_name(task) in history[-1]
    if task == "classification":
        assert history[-1]["accuracy"] > 0.2


@pytest.mark.slow
def test_mlp_trains_on_two_horovod_workers(spark, prepared_small):
    import horovod.torch  # noqa: F401  (`make test` installs Horovod; a missing one must fail, not skip)
    cfg, prepared = prepared_small
    tables = {s: (t["uri"], t["version"]) for s, t in prepared["tables"].items()}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="mlp"))
    result = launch(spark, _task(cfg, tables, modeling.image_net(cfg.model, cfg.data)), "horovod", 2)
    assert result["world_size"] == 2 and result["history"][-1]["loss"] < result["history"][0]["loss"]


@pytest.fixture(scope="module")
def diabetes_tables(spark, tmp_path_factory):
    """scikit-learn's real diabetes data (442 patients, 10 features, a continuous target) as
    Delta tables shaped like the table pipeline's: key, source, label double, features."""
    from sklearn.datasets import load_diabetes

    from pipelines.split import hash_split

    root = tmp_path_factory.mktemp("diabetes")
    cfg = load_config(None, [f"paths.lake={root}/lake", f"mlflow.tracking_uri={mlflow_store(root)}",
                             f"mlflow.artifact_root={root}/mlartifacts", "data.name=diabetes", "model.name=mlp",
                             "model.task=regression", "model.mlp.hidden=[32, 16]", "model.mlp.dropout=0.0",
                             "model.mlp.batch_norm=true", "train.backend=local", "train.epochs=30", "train.batch_size=32",
                             "train.lr=0.01", "train.checkpoint_every=0", "registry.model_name=diabetes_mlp"])
    x, y = load_diabetes(return_X_y=True)
    pdf = pd.DataFrame({"key": [f"patient_{i:03d}" for i in range(len(y))], "source": "sklearn.datasets.load_diabetes",
                        "label": (y / 100.0).astype(float), "features": [row.astype(np.float32).tolist() for row in x]})
    df = hash_split(spark.createDataFrame(pdf, "key string, source string, label double, features array<float>"),
                      {"train": 0.7, "val": 0.15, "test": 0.15}).cache()
    for split in ("train", "val", "test"):
        lake.write_table(df.where(df.split == split).drop("split"), cfg.table_uri(split))
    return cfg


def test_mlp_regression_on_a_table_end_to_end(spark, diabetes_tables):
    """Table in, `features` column, double labels: MSE training, R^2 at evaluate, a `prediction`
    double from the registered pyfunc model."""
    cfg = diabetes_tables
    trained = stage("train", spark, cfg)
    assert trained["metrics"]["val_mae"] < trained["metrics"]["mae"] * 2 and "accuracy" not in trained["metrics"]
    evaluated = stage("evaluate", spark, with_run(cfg, trained["run_id"]))
    m = evaluated["metrics"]
    assert m["test_r2"] > 0.2 and m["test_mse"] > 0 and evaluated["champion"]
    model = mlflow.pyfunc.load_model("models:/diabetes_mlp@champion")
    row = lake.read_table(spark, cfg.table_uri("test")).select("features").limit(3).toPandas()
    out = model.predict(pd.DataFrame({"features": [list(map(float, f)) for f in row["features"]]}))
    assert list(out.columns) == ["prediction"] and out["prediction"].dtype == np.float64 and len(out) == 3
    assert [c.name for c in model.metadata.signature.inputs.inputs] == ["features"]
