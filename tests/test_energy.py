"""Energy-based models and collaborative filtering (issue 16): the RBM's contrastive divergence is
the gradient of a free-energy difference and equals the textbook update; deep belief nets
pretrain layer by layer; the ratings RBM and AutoRec never learn from a missing rating; then, on
real Spark, Horovod and MLflow: a 2-worker averaged RBM epoch, the train stage's figures, and
MovieLens recommenders trained, evaluated, served without dlpipe and asked for recommendations."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from dl.models import REGISTRY, Net, build
from dl.models.autorec import AutoRecConfig, FoldIn
from dl.models.dbn import DBNConfig
from dl.models.rbm import RBMConfig
from dl.models.rbm_cf import RBMCFConfig
from dl.train import TrainConfig, fit
from tests.conftest import WITHOUT_DLPIPE, make_config, mlflow_store, stage


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _rbm(shape=(3,), **params):
    return build(Net(name="rbm", params=RBMConfig(**params), input_shape=shape, num_outputs=1, task="reconstruction"))


def _step(model, x, lr, seed=7):
    """One SGD step of lr on the model's objective; returns the parameters before it."""
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    torch.manual_seed(seed)
    loss, _ = model.objective(torch.from_numpy(x), None)[:2]
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return before


def test_cd1_update_on_a_3x2_rbm_equals_the_hand_computed_one():
    model = _rbm(hidden=2)
    W = np.array([[0.5, -0.3, 0.2], [-0.4, 0.1, 0.6]], np.float32)  # hidden x visible
    b, c = np.array([0.1, -0.2, 0.05], np.float32), np.array([-0.1, 0.3], np.float32)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(W))
        model.linear.bias.copy_(torch.from_numpy(c))
        model.visible_bias.copy_(torch.from_numpy(b))
    v0 = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
    _step(model, v0, lr=0.5)

    ph0 = _sigmoid(v0 @ W.T + c)
    torch.manual_seed(7)  # the hidden sample the model drew: the same uniforms against the same probabilities
    h0 = torch.bernoulli(torch.from_numpy(ph0.astype(np.float32))).numpy()
    v1 = _sigmoid(h0 @ W + b)  # the reconstruction: probabilities at the chain's last step
    ph1 = _sigmoid(v1 @ W.T + c)
    n = len(v0)
    assert np.allclose(model.linear.weight.detach().numpy(), W + 0.5 * (ph0.T @ v0 - ph1.T @ v1) / n, atol=1e-6)
    assert np.allclose(model.visible_bias.detach().numpy(), b + 0.5 * (v0 - v1).mean(0), atol=1e-6)
    assert np.allclose(model.linear.bias.detach().numpy(), c + 0.5 * (ph0 - ph1).mean(0), atol=1e-6)


@pytest.mark.parametrize("visible", ["bernoulli", "gaussian"])
def test_free_energy_gradient_is_the_cd_update(visible):
    """d/dtheta [mean F(v0) - mean F(vk)] = -(<v h>_data - <v h>_model) for any chain state vk."""
    from dl.models.rbm import cd_loss

    torch.manual_seed(0)
    model = _rbm(shape=(5,), hidden=4, visible=visible)
    v0, vk = torch.rand(6, 5), torch.randn(6, 5) if visible == "gaussian" else torch.rand(6, 5)
    cd_loss(model.linear, model.visible_bias, v0, vk, visible == "gaussian").backward()
    with torch.no_grad():
        ph0, phk = torch.sigmoid(model.linear(v0)), torch.sigmoid(model.linear(vk))
    update_w = (ph0.T @ v0 - phk.T @ vk) / 6
    assert torch.allclose(-model.linear.weight.grad, update_w, atol=1e-6)
    assert torch.allclose(-model.visible_bias.grad, (v0 - vk).mean(0), atol=1e-6)
    assert torch.allclose(-model.linear.bias.grad, (ph0 - phk).mean(0), atol=1e-6)


def test_persistent_chains_carry_over_between_steps_and_cd_restarts_from_the_data():
    x = (np.random.default_rng(0).random((8, 6)) < 0.5).astype(np.float32)
    pcd, cd = _rbm(shape=(6,), hidden=3, persistent=True), _rbm(shape=(6,), hidden=3)
    for model in (pcd, cd):
        _step(model, x, lr=0.1)
    assert pcd.chains is not None and pcd.chains.shape == (8, 6) and set(pcd.chains.unique().tolist()) <= {0.0, 1.0}
    assert cd.chains is None
    seen = []
    original = pcd.__class__.objective.__globals__["gibbs"]

    def spy(linear, bias, v, k, gaussian):
        seen.append(v.clone())
        return original(linear, bias, v, k, gaussian)

    pcd.__class__.objective.__globals__["gibbs"] = spy
    try:
        chains = pcd.chains.clone()
        _step(pcd, x, lr=0.1)
    finally:
        pcd.__class__.objective.__globals__["gibbs"] = original
    assert torch.equal(seen[0], chains)  # the negative phase started where the last one ended


def test_rbm_trains_with_the_trainer_and_reports_free_energy():
    rng = np.random.default_rng(1)
    x = (rng.random((512, 1, 4, 4)) < np.linspace(0.1, 0.9, 16).reshape(1, 1, 4, 4)).astype(np.float32)
    model = _rbm(shape=(1, 4, 4), hidden=8)
    history = fit(model, (x, np.zeros(512, np.float32)), (x[:128], np.zeros(128, np.float32)),
                  TrainConfig(epochs=4, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.5, lr_schedule="constant"),
                  task="reconstruction", log=lambda line: None)
    assert history[-1]["val_mse"] < history[0]["val_mse"]
    from dl.models.rbm import free_energy

    with torch.no_grad():
        expected = free_energy(model.linear, model.visible_bias, torch.from_numpy(x[:128]).flatten(1), False).mean().item()
    assert history[-1]["val_free_energy"] == pytest.approx(expected, rel=1e-5)
    assert model.sample(3, 10).shape == (3, 1, 4, 4) and model.filters().shape == (8, 1, 4, 4)


def test_dbn_pretrains_one_layer_at_a_time_then_fine_tunes_everything():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 256)
    x = (rng.random((256, 8)) < np.where(y[:, None] == 1, 0.8, 0.2)).astype(np.float32)
    model = build(Net(name="dbn", params=DBNConfig(layers=[6, 4]), input_shape=(8,), num_outputs=2, task="classification"))
    model.set_pretraining(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"features.3.weight", "features.3.bias", "visible_biases.1"}
    loss, _ = model.objective(torch.from_numpy(x[:16]), torch.from_numpy(y[:16]))
    loss.backward()
    assert model.linears[0].weight.grad is None  # frozen below the layer being pretrained
    model.set_pretraining(None)
    assert all(p.requires_grad for p in model.parameters())

    model = build(Net(name="dbn", params=DBNConfig(layers=[6, 4]), input_shape=(8,), num_outputs=2, task="classification"))
    first = model.linears[0].weight.detach().clone()
    history = fit(model, (x, y), (x[:64], y[:64]), TrainConfig(epochs=8, pretrain="greedy", pretrain_epochs=1, batch_size=16, lr=0.05),
                  log=lambda line: None)
    assert len(history) == 10
    assert {"val_layer1_free_energy", "val_layer1_reconstruction_mse"} <= set(history[0])
    assert {"val_layer2_free_energy", "val_layer2_reconstruction_mse"} <= set(history[1])
    assert not any(k.startswith("val_layer") for k in history[2])
    assert not torch.equal(first, model.linears[0].weight)
    assert history[-1]["val_accuracy"] > 0.8


def _ratings(users=40, items=12, seed=3):
    rng = np.random.default_rng(seed)
    r = rng.integers(1, 6, (users, items)).astype(np.float32)
    r[rng.random((users, items)) < 0.6] = 0
    return r


@pytest.mark.parametrize("name", ["rbm_cf", "autorec"])
def test_a_missing_rating_never_contributes_to_the_loss(name):
    params = RBMCFConfig(hidden=5) if name == "rbm_cf" else AutoRecConfig(hidden=5)
    model = build(Net(name=name, params=params, input_shape=(12,), num_outputs=1, task="recommendation"))
    r = torch.from_numpy(_ratings())
    r[:, 4] = 0  # nobody rated item 4
    torch.manual_seed(0)
    model.train()
    loss, sse, n = model.objective(r, r)
    assert n == (r > 0).sum()
    loss.backward()
    if name == "rbm_cf":
        assert torch.count_nonzero(model.weight.grad[4]) == 0 and torch.count_nonzero(model.visible_bias.grad[4]) == 0
        assert torch.count_nonzero(model.weight.grad) > 0
    else:
        assert torch.count_nonzero(model.decoder.weight.grad[4]) == 0 and model.decoder.bias.grad[4] == 0
    # evaluating: the held-out ratings y only; what the model predicts for an unrated entry of y does not count
    model.eval()
    known, held_out = r.clone(), torch.zeros_like(r)
    held_out[:, 0], known[:, 0] = r[:, 0], 0
    loss, sse, n = model.objective(known, held_out)
    predicted = model(known)
    rated = held_out > 0
    assert n == rated.sum() and sse.item() == pytest.approx(((predicted - held_out)[rated] ** 2).sum().item(), rel=1e-5)
    with torch.no_grad():  # change every prediction but those of item 0: the loss stays
        if name == "rbm_cf":
            model.visible_bias[1:] += 1.0
        else:
            model.decoder.bias[1:] += 1.0
    assert model.objective(known, held_out)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_rbm_cf_predicts_the_expected_rating_on_the_rating_scale():
    model = build(Net(name="rbm_cf", params=RBMCFConfig(hidden=3, min_rating=1, max_rating=5), input_shape=(4,),
                      num_outputs=1, task="recommendation"))
    with torch.no_grad():
        model.visible_bias[2] = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0])  # item 2: a 5 is likely
    x = torch.tensor([[0.0, 3.0, 0.0, 1.0]])
    v = model.one_hot(x)
    assert v.shape == (1, 4, 5) and v[0, 0].sum() == 0 and v[0, 1, 2] == 1 and v[0, 3, 0] == 1
    predicted = model(x)
    assert ((predicted >= 1) & (predicted <= 5)).all() and predicted[0, 2] > 4.5


def test_fit_reports_the_root_mean_squared_error_over_rated_entries():
    r = _ratings(users=64)
    val_known, val_held = r.copy(), np.zeros_like(r)
    val_held[:, :3], val_known[:, :3] = r[:, :3], 0
    model = build(Net(name="autorec", params=AutoRecConfig(hidden=4), input_shape=(12,), num_outputs=1, task="recommendation"))
    history = fit(model, (r, r), (val_known, val_held), TrainConfig(epochs=2, batch_size=16), task="recommendation",
                  log=lambda line: None)
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(val_known)).numpy()
    rated = val_held > 0
    assert history[-1]["val_rmse"] == pytest.approx(np.sqrt(((predicted - val_held)[rated] ** 2).mean()), rel=1e-5)


@pytest.mark.parametrize("name", ["autorec", "rbm_cf"])
def test_an_item_based_recommender_is_served_to_users_through_its_training_matrix(name):
    r = _ratings(users=6)  # users x items: the training matrix
    params = AutoRecConfig(hidden=4, based="item") if name == "autorec" else RBMCFConfig(hidden=4, based="item")
    net = build(Net(name=name, params=params, input_shape=(6,), num_outputs=1, task="recommendation")).eval()
    with torch.no_grad():
        if name == "autorec":
            net.decoder.bias.fill_(3.0)  # predictions inside the rating scale, not clipped
        else:
            net.weight.normal_(0, 1.0)  # hidden units that tell users apart
    served = FoldIn(net, torch.from_numpy(r))
    with torch.no_grad():
        by_item = net(torch.from_numpy(r.T.copy())).T  # every item's ratings by every user through the net
        out = served(torch.from_numpy(r[[4, 1]]), torch.tensor([4, 1]))
        assert out.shape == (2, 12) and torch.allclose(out, by_item[[4, 1]], atol=1e-6)
        changed = r.copy()
        changed[1, np.flatnonzero(r[1] == 0)[0]] = 5.0  # user 1 rates one more item: their row of the matrix changes
        folded = served(torch.from_numpy(changed[[1]]), torch.tensor([1]))[0]
        assert torch.allclose(folded, net(torch.from_numpy(changed.T.copy())).T[1], atol=1e-6)
        assert not torch.allclose(folded, by_item[1], atol=1e-4)


def test_two_rows_of_one_user_in_one_batch_are_each_scored_with_their_own_ratings():
    """The served item-based model: a consumer asks for one user twice in a batch (two what-ifs)."""
    from dlpipe.pyfunc_model import TorchModel

    r = _ratings(users=6)
    net = build(Net(name="autorec", params=AutoRecConfig(hidden=4, based="item"), input_shape=(6,), num_outputs=1,
                    task="recommendation")).eval()
    with torch.no_grad():
        net.decoder.bias.fill_(3.0)  # predictions inside the rating scale, not clipped
    model = TorchModel()
    model.module, model.task, model.column, model.value_range = FoldIn(net, torch.from_numpy(r)), "recommendation", "ratings", None
    model.input_shape, model.width, model.items = (12,), 12, [f"i{i}" for i in range(12)]
    model.users = [str(u) for u in range(6)]
    model.user_index = {u: i for i, u in enumerate(model.users)}
    what_if = r[1].copy()
    what_if[np.flatnonzero(r[1] == 0)[0]] = 5.0
    rows = [r[1], r[2], what_if]
    out = model.predict(None, pd.DataFrame({"user": ["1", "2", "1"], "ratings": [list(v) for v in rows]}))
    with torch.no_grad():
        alone = [model.predict(None, pd.DataFrame({"user": [u], "ratings": [list(v)]}))["predicted"][0]
                 for u, v in zip(["1", "2", "1"], rows)]
    for got, expected in zip(out["predicted"], alone):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(out["predicted"][0], out["predicted"][2], atol=1e-4)


def test_recommender_configs_need_rating_data():
    from dlpipe.config import load_config
    from dlpipe.errors import ConfigError

    for conf, name in (("conf/movielens_rbm.yaml", "rbm_cf"), ("conf/movielens_autorec.yaml", "autorec")):
        cfg = load_config(conf)
        assert (cfg.model.name, cfg.model.task, cfg.data.kind) == (name, "recommendation", "ratings")
    tables = load_config("conf/movielens_rbm.yaml", ["model.rbm_cf.based=user"]).model_tables()
    assert [tables[s].rsplit("/", 1)[1] for s in ("train", "val", "test")] == \
        ["movielens_vectors_train", "movielens_vectors_val", "movielens_vectors_test"]
    # an item-based recommender trains by item and is evaluated per user, as it is served
    for conf, key in (("conf/movielens_autorec.yaml", "autorec"), ("conf/movielens_rbm.yaml", "rbm_cf")):
        tables = load_config(conf, [f"model.{key}.based=item"]).model_tables()
        assert [tables[s].rsplit("/", 1)[1] for s in ("train", "val", "test")] == \
            ["movielens_item_vectors_train", "movielens_item_vectors_val", "movielens_vectors_test"]
    assert load_config("conf/movielens_autorec.yaml", ["model.autorec.based=user"]).model_tables()["val"] \
        .endswith("/movielens_vectors_val")
    with pytest.raises(ConfigError, match="model.autorec.based"):
        load_config("conf/movielens_autorec.yaml", ["model.autorec.based=items"])
    with pytest.raises(ConfigError, match="data.kind': model rbm_cf reads rating vectors"):
        load_config(None, ["model.name=rbm_cf", "model.task=recommendation"])
    with pytest.raises(ConfigError, match="min_rating"):
        load_config("conf/movielens_rbm.yaml", ["data.ratings.min_rating=0"])
    for conf, name in (("conf/fashion_rbm.yaml", "rbm"), ("conf/fashion_dbn.yaml", "dbn")):
        assert load_config(conf).model.name == name
    assert {"rbm", "dbn", "rbm_cf", "autorec"} <= set(REGISTRY)


# ---------------------------------------------------------------- real Spark, Horovod, MLflow


@pytest.mark.slow
def test_an_rbm_epoch_on_two_horovod_workers_is_the_average_of_each_workers_epoch(spark, tmp_path):
    """Parameter averaging once per epoch: the model after one epoch on 2 workers is the mean of
    the models each worker reaches alone on its shard (its own Gibbs samples, same seed per rank)."""
    from dl.train import SingleProcess
    from dlpipe.launchers import TrainTask, launch, load_shard
    from tests.test_distributed import _files

    rng = np.random.default_rng(4)
    x = (rng.random((256, 1, 4, 4)) < 0.4).astype(np.float32)
    net = Net(name="rbm", params=RBMConfig(hidden=6), input_shape=(1, 4, 4), num_outputs=1, task="reconstruction")
    once = TrainConfig(epochs=1, batch_size=16, lr=0.1, optimizer="sgd", shuffle=False, sync="average",
                       average_every=10_000, checkpoint_every=0, seed=3)
    task = TrainTask(net=net, train=once, train_files=_files(tmp_path, "train", x, np.zeros(256, int)),
                     val_files=_files(tmp_path, "val", x[:32], np.zeros(32, int)), threads=1)
    averaged = launch(spark, task, "horovod", 2)
    assert (averaged["backend"], averaged["world_size"]) == ("horovod", 2)

    class Rank(SingleProcess):  # one worker alone, drawing the random numbers its rank draws
        def __init__(self, rank):
            self.rank = rank

    alone, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    for rank in (0, 1):
        torch.manual_seed(once.seed)
        model = build(net)
        fit(model, load_shard(task.train_files, (1, 4, 4), rank, 2, task="reconstruction"),
            load_shard(task.val_files, (1, 4, 4), rank, 2, task="reconstruction"), once, Rank(rank),
            task="reconstruction", log=lambda line: None)
        alone.append(model.state_dict())
    torch.set_num_threads(threads)
    for key, value in averaged["state_dict"].items():
        assert torch.allclose(value, (alone[0][key] + alone[1][key]) / 2, atol=1e-6), key
        assert not torch.allclose(alone[0][key], alone[1][key], atol=1e-4), key  # two different epochs were averaged


@pytest.mark.slow
def test_rbm_and_dbn_train_stage_log_their_figures_and_layer_metrics(spark, prepared_small, tmp_path):
    cfg, _ = prepared_small
    base = dict(backend="local", epochs=2, checkpoint_every=0)
    rbm = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name="rbm", task="reconstruction", rbm=RBMConfig(hidden=16)),
        train=dataclasses.replace(cfg.train, optimizer="sgd", lr=0.05, momentum=0.5, run_name="small_rbm", **base),
        registry=dataclasses.replace(cfg.registry, model_name="small_rbm"),
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=mlflow_store(tmp_path), artifact_root=f"{tmp_path}/art"))
    run = stage("train", spark, rbm)
    client = MlflowClient(rbm.mlflow.tracking_uri)
    logged = {a.path for a in client.list_artifacts(run["run_id"], "plots")}
    assert {"plots/filters.png", "plots/gibbs_samples.png", "plots/reconstructions.png", "plots/training_curves.png"} <= logged
    assert len(client.get_metric_history(run["run_id"], "val_free_energy")) == 2

    dbn = dataclasses.replace(
        rbm, model=dataclasses.replace(cfg.model, name="dbn", task="classification", dbn=DBNConfig(layers=[32, 16])),
        train=dataclasses.replace(cfg.train, pretrain="greedy", pretrain_epochs=1, run_name="small_dbn", **base),
        registry=dataclasses.replace(cfg.registry, model_name="small_dbn", min_accuracy=0.0))
    run = stage("train", spark, dbn)
    metrics = client.get_run(run["run_id"]).data.metrics
    assert {"val_layer1_free_energy", "val_layer2_reconstruction_mse", "val_accuracy"} <= set(metrics)
    assert [m.step for m in client.get_metric_history(run["run_id"], "val_layer2_free_energy")] == [2]
    evaluated = stage("evaluate", spark, dataclasses.replace(dbn, evaluate=dataclasses.replace(dbn.evaluate, run_id=run["run_id"])))
    assert evaluated["model_uri"].startswith("models:/small_dbn/") and 0 <= evaluated["metrics"]["test_accuracy"] <= 1


@pytest.fixture(scope="module")
def movielens(spark, tmp_path_factory):
    """The ratings of MovieLens 100k's first 120 users, landed and prepared (split by rating)."""
    from dlpipe import datasets

    root = tmp_path_factory.mktemp("movielens")
    landing = root / "landing"
    landing.mkdir()
    ratings = datasets.movielens100k()
    datasets.write_shards(ratings[ratings["user_id"] <= 120], landing, 2, "parquet")
    cfg = make_config(root, f"paths.landing={landing}", conf="conf/movielens.yaml")
    return root, landing, stage("prepare", spark, cfg)


def _recommender(root, landing, name, **train):
    conf = {"rbm_cf": "conf/movielens_rbm.yaml", "autorec": "conf/movielens_autorec.yaml"}[name]
    # one of each serving path: the paper's user-based RBM (any user, from their ratings) and the
    # item-based AutoRec (through its training matrix; the item-based RBM is served the same way)
    based = "model.rbm_cf.based=user" if name == "rbm_cf" else "model.autorec.based=item"
    return make_config(root, f"paths.landing={landing}", "train.epochs=2", "train.checkpoint_every=0",
                       f"train.run_name=small_{name}", f"registry.model_name=small_{name}", based,
                       *[f"train.{k}={v}" for k, v in train.items()], conf=conf)


@pytest.fixture(scope="module")
def recommenders(spark, movielens):
    """The ratings RBM (2 Horovod workers) and AutoRec (one process), trained 2 epochs and evaluated:
    {name: (config, train summary, evaluate summary)}."""
    root, landing, _ = movielens
    out = {}
    for name, backend in (("rbm_cf", "horovod"), ("autorec", "local")):
        cfg = _recommender(root, landing, name, backend=backend)
        run = stage("train", spark, cfg)
        out[name] = (cfg, run, stage("evaluate", spark, dataclasses.replace(
            cfg, evaluate=dataclasses.replace(cfg.evaluate, run_id=run["run_id"]))))
    return out


@pytest.mark.slow
def test_recommenders_train_evaluate_and_recommend_only_unrated_items(spark, movielens, recommenders):
    from dlpipe.tracking import load_net
    from tests.conftest import read_table

    root, landing, prepared = movielens
    val = read_table(prepared, "vectors_val").set_index("user")
    train_vectors = read_table(prepared, "vectors_train").set_index("user")
    for user in val.index[:10]:  # `given`: the user's train ratings, what a model predicts the val ratings from
        assert np.array_equal(val.loc[user, "given"], train_vectors.loc[user, "ratings"])

    results = {}
    for name, (cfg, run, evaluated) in recommenders.items():
        assert run["world_size"] == (2 if name == "rbm_cf" else 1)
        assert 0 < run["metrics"]["val_rmse"] < 4
        m = evaluated["metrics"]
        assert 0 < m["test_rmse"] < 4 and m["test_mae"] <= m["test_rmse"] and m["test_ratings"] > m["test_rows"] > 0
        assert evaluated["champion"]
        results[name] = (cfg, evaluated)

    # the item-based AutoRec's test RMSE from its net, in this process, on the train matrix by item:
    # the same figure evaluate logged through the served model on the per-user test vectors
    cfg, evaluated = results["autorec"]
    model, meta = load_net(evaluated["model_uri"])
    items = meta["items"]
    assert items == list(read_table(prepared, "items").sort_values("index")["item"])
    assert meta["users"] == list(read_table(prepared, "users").sort_values("index")["user"])
    by_item = read_table(prepared, "item_vectors_train").set_index("item")
    item_val = read_table(prepared, "item_vectors_val").set_index("item")
    none = np.zeros(len(meta["users"]), np.float32)  # an item nobody rated in train
    for item in item_val.index[:10]:
        assert np.array_equal(item_val.loc[item, "given"], by_item.loc[item, "ratings"] if item in by_item.index else none)
    known = np.stack([by_item.loc[i, "ratings"] if i in by_item.index else none for i in items])
    with torch.no_grad():
        every = model(torch.from_numpy(known)).numpy().T  # users x items
    test = read_table(prepared, "vectors_test")
    position = {u: i for i, u in enumerate(meta["users"])}
    predicted = every[[position[u] for u in test["user"]]]
    held = np.stack(test["ratings"])
    assert evaluated["metrics"]["test_rmse"] == pytest.approx(np.sqrt(((predicted - held)[held > 0] ** 2).mean()), rel=1e-4)

    # one user's list: never an item they rated in any split
    rows = pd.concat([read_table(prepared, s) for s in ("train", "val", "test")])
    user = rows["user"].value_counts().index[0]  # the heaviest rater
    rated = set(rows[rows["user"] == user]["item"])
    one = stage("recommend", spark, cfg, model="", user=user, k=15)
    listed = [r["item"] for r in one["recommendations"]]
    assert len(listed) == 15 and not set(listed) & rated and [r["rank"] for r in one["recommendations"]] == list(range(1, 16))
    assert all(a["predicted"] >= b["predicted"] for a, b in zip(one["recommendations"], one["recommendations"][1:]))
    with pytest.raises(Exception, match="has no ratings"):
        stage("recommend", spark, cfg, model="", user="no-such-user", k=5)
    from dlpipe.errors import DlpipeError
    from dlpipe.scoring import predict

    with pytest.raises(DlpipeError, match="is a recommender: it scores rating vectors"):
        predict(spark, spark.range(1), evaluated["model_uri"])

    # every user's list, into the recommendations table
    batch = stage("recommend", spark, cfg, model=results["rbm_cf"][1]["model_uri"], user="", k=5)
    import deltalake

    table = deltalake.DeltaTable(batch["table"]["uri"], version=batch["table"]["version"]).to_pandas()
    assert batch["users"] == rows["user"].nunique() == table["user"].nunique() and len(table) == 5 * batch["users"]
    pairs = set(zip(rows["user"], rows["item"]))
    assert not any((u, i) in pairs for u, i in zip(table["user"], table["item"]))
    assert table["rejected_reason"].isna().all()


@pytest.mark.slow
def test_bench_energy_cf_case_scores_every_recommender_and_als_on_the_same_test_ratings(spark, movielens):
    """`dlpipe bench models --family energy`, its CF case at 1 epoch in one process: the item- and
    user-based RBM and AutoRec and a 2-point ALS grid, each a test RMSE; the goal judged from them."""
    from benchmarks import energy

    root, landing, _ = movielens
    cfg = make_config(root, f"paths.landing={landing}", conf="conf/movielens.yaml")
    out = energy.cf_case(spark, cfg, "conf/movielens_rbm.yaml", "conf/movielens_autorec.yaml", "local", 1, 1, epochs=1,
                         als_grid={"ranks": (10,), "regs": (0.05, 0.1), "iterations": 5})
    for key in ("rbm", "u_rbm", "autorec", "u_autorec", "als"):
        assert 0 < out[f"{key}_rmse"] < 4, key
    assert [out[f"{k}_setup"]["model"]["based"] for k in ("rbm", "u_rbm", "autorec", "u_autorec")] == ["item", "user", "item", "user"]
    assert out["rbm_setup"]["epochs"] == 1 and [g["regParam"] for g in out["als_grid"]] == [0.05, 0.1]
    assert out["als_best"]["regParam"] == min(out["als_grid"], key=lambda g: g["val_rmse"])["regParam"]
    assert out["goal_met"] == (max(out["rbm_rmse"], out["autorec_rmse"]) < out["als_rmse"]
                               and min(out["rbm_rmse"], out["autorec_rmse"]) <= 0.91)

CONSUMER = WITHOUT_DLPIPE + textwrap.dedent("""
    import mlflow, pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])

    def refusal(model, frame):
        try:
            model.predict(frame)
            return ""
        except Exception as exc:
            return str(exc)

    results = []
    for case in json.loads(sys.argv[2]):  # {uri, rows, users (item-based: the users of the rows)}
        model = mlflow.pyfunc.load_model(case["uri"])
        rows, users = case["rows"], case["users"]
        frame = pd.DataFrame(({"user": users} if users else {}) | {"ratings": rows})
        out = model.predict(frame)
        refused = [refusal(model, frame.head(1).assign(ratings=[rows[0][:-1]]))]
        if users:
            refused += [refusal(model, frame.head(1).assign(user=["no-such-user"])), refusal(model, frame[["ratings"]])]
        results.append({"predicted": [list(map(float, p)) for p in out["predicted"]],
                        "recommended": [list(r) for r in out["recommended"]], "refused": refused})
    print(json.dumps(results))
""")


@pytest.mark.slow
def test_recommender_pyfunc_round_trips_without_dlpipe(movielens, recommenders, tmp_path):
    from dlpipe.tracking import load_net
    from tests.conftest import read_table

    _, _, prepared = movielens
    test = read_table(prepared, "vectors_test").head(3)
    rows, users = [list(map(float, v)) for v in test["given"]], list(test["user"])
    cfg = recommenders["rbm_cf"][0]
    uris = {name: run["model_uri"] for name, (_, run, _) in recommenders.items()}
    cases = [{"uri": uris["rbm_cf"], "rows": rows, "users": []}, {"uri": uris["autorec"], "rows": rows, "users": users}]
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(script), cfg.mlflow.tracking_uri, json.dumps(cases)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = dict(zip(("rbm_cf", "autorec"), json.loads(proc.stdout.strip().splitlines()[-1])))
    by_item = read_table(prepared, "item_vectors_train").set_index("item")
    for name, out in served.items():
        model, meta = load_net(uris[name])
        with torch.no_grad():
            if name == "rbm_cf":
                expected = model(torch.tensor(rows)).numpy()
            else:  # the net over every item's train ratings, with these users' rows as given: their columns
                known = np.stack([by_item.loc[i, "ratings"] if i in by_item.index else np.zeros(len(meta["users"]), np.float32)
                                  for i in meta["items"]])
                position = [meta["users"].index(u) for u in users]
                known[:, position] = np.array(rows).T
                expected = model(torch.from_numpy(known)).numpy().T[position]
        assert np.allclose(out["predicted"], expected, atol=1e-4), name
        for given, recommended, predicted in zip(rows, out["recommended"], expected):
            unrated = [i for i, r in enumerate(given) if r == 0]
            best = sorted(unrated, key=lambda i: -predicted[i])[:10]
            assert recommended == [meta["items"][i] for i in best]
        assert f"expected `ratings`: {len(rows[0])} finite floats per row" in out["refused"][0]
    assert "user 'no-such-user' is not in the model's training matrix" in served["autorec"]["refused"][1]
    assert "missing inputs ['user']" in served["autorec"]["refused"][2]  # MLflow's schema check, before the model's own
