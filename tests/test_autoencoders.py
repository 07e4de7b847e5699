"""Autoencoders and self-organizing maps (issue 15): tied weights, the sparse and contractive
penalties and a batch-SOM epoch against hand computations; then, on the small real slice, both
trained by the train stage (plots logged), registered by evaluate, served without dlpipe, and
`dlpipe anomalies` through the CLI; a batch-SOM epoch on 2 Horovod workers equals 1 worker's."""

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
from dl.models.autoencoder import AutoencoderConfig
from dl.models.som import SOMConfig
from dl.train import SingleProcess, TrainConfig, fit
from tests.conftest import WITHOUT_DLPIPE, mlflow_store, read_table, stage, with_run


def _ae(shape=(5,), **params) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(Net(name="autoencoder", params=AutoencoderConfig(**params), input_shape=shape, num_outputs=1,
                     task="reconstruction"))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_tied_decoder_is_the_transposed_encoder():
    tied, untied = _ae(encoder=[4], code=3, tied=True), _ae(encoder=[4], code=3)
    (w1, b1), (w2, b2) = [(_np(m.weight), _np(m.bias)) for m in tied.encoder_linears]
    # tied: one weight matrix per encoder layer and nothing else but biases
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == w1.size + w2.size
    x = np.random.default_rng(1).normal(size=(6, 5))
    code = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2  # relu hidden layer, linear code
    c1, c0 = (_np(b) for b in tied.decoder_bias)
    rebuilt = np.maximum(code @ w2 + c1, 0) @ w1 + c0  # the decoder: the same matrices, transposed
    assert np.allclose(_np(tied(torch.tensor(x, dtype=torch.float32))), rebuilt, atol=1e-5)
    loss, _ = tied.objective(torch.tensor(x, dtype=torch.float32), torch.zeros(6))
    loss.backward()  # the decoder's share of the gradient lands on the encoder's weights
    assert tied.encoder_linears[1].weight.grad is not None and not hasattr(tied, "decoder")


def test_sparse_kl_term_matches_the_hand_computed_value():
    model = _ae(encoder=[], code=3, kind="sparse", sparsity=0.1, sparsity_weight=0.5)
    x = np.random.default_rng(2).uniform(size=(8, 5))
    (w, b), (d, c) = (_np(model.encoder_linears[0].weight), _np(model.encoder_linears[0].bias)), \
        (_np(model.decoder[0].weight), _np(model.decoder[0].bias))
    code = _sigmoid(x @ w.T + b)
    rho = code.mean(0)
    kl = np.sum(0.1 * np.log(0.1 / rho) + 0.9 * np.log(0.9 / (1 - rho)))
    mse = ((code @ d.T + c - x) ** 2).mean(1)
    loss, errors = model.train().objective(torch.tensor(x, dtype=torch.float32), torch.zeros(8))
    assert kl > 0.1 and loss.item() == pytest.approx(mse.mean() + 0.5 * kl, rel=1e-5)
    assert errors.item() == pytest.approx(mse.sum(), rel=1e-5)


def test_contractive_penalty_is_the_hand_computed_jacobian_norm():
    model = _ae(encoder=[4], code=2, kind="contractive", activation="sigmoid", contractive_weight=0.3)
    x = np.random.default_rng(3).uniform(size=(6, 5))
    (w1, b1), (w2, _) = [(_np(m.weight), _np(m.bias)) for m in model.encoder_linears]
    s = _sigmoid(x @ w1.T + b1)
    # d code / d x = W2 diag(s (1 - s)) W1 for each row
    norms = [np.sum((w2 @ np.diag(si * (1 - si)) @ w1) ** 2) for si in s]
    xt = torch.tensor(x, dtype=torch.float32)
    assert model.jacobian_penalty(xt).item() == pytest.approx(np.mean(norms), rel=1e-5)
    loss, errors = model.objective(xt, torch.zeros(6))
    assert loss.item() == pytest.approx(errors.item() / 6 + 0.3 * np.mean(norms), rel=1e-5)


def test_denoising_corrupts_only_training_inputs():
    model = _ae(encoder=[4], code=2, kind="denoising", noise=0.5)
    x = torch.rand(16, 5)
    clean = model.eval().objective(x, torch.zeros(16))[0].item()
    assert model.objective(x, torch.zeros(16))[0].item() == clean
    torch.manual_seed(1)
    assert model.train().objective(x, torch.zeros(16))[0].item() != pytest.approx(clean)


def test_greedy_pretraining_freezes_then_releases_layers():
    """Encoder layer 0 and its mirror, then layer 1 and its mirror, each alone; then everything."""
    model = _ae(shape=(1, 4, 4), encoder=[6], code=3)
    x = np.random.default_rng(7).uniform(size=(64, 1, 4, 4)).astype(np.float32)
    names = [n for n, _ in model.named_parameters()]
    groups = {0: {"features.1.weight", "features.1.bias", "decoder.1.weight", "decoder.1.bias"},
              1: {"features.3.weight", "features.3.bias", "decoder.0.weight", "decoder.0.bias"}}
    assert groups[0] | groups[1] == set(names)
    states = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    lines = []
    history = fit(model, (x, np.zeros(64)), (x[:16], np.zeros(16)),
                  TrainConfig(epochs=1, pretrain="greedy", pretrain_epochs=2, batch_size=16, lr=0.01),
                  task="reconstruction", log=lines.append,
                  on_epoch=lambda m: states.append({n: p.detach().clone() for n, p in model.named_parameters()}))
    assert len(history) == 5 and "pretraining layer 2" in lines[3] and "pretraining" not in lines[4]
    for epoch, layer in ((1, 0), (2, 0), (3, 1), (4, 1), (5, None)):
        moved = {n for n in names if not torch.equal(states[epoch][n], states[epoch - 1][n])}
        assert moved == (groups[layer] if layer is not None else set(names)), epoch
    assert model.pretraining is None and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no layers to pretrain"):
        fit(_som(), (x.reshape(64, -1)[:, :3], np.zeros(64)), (x.reshape(64, -1)[:16, :3], np.zeros(16)),
            TrainConfig(epochs=1, pretrain="greedy", batch_size=16), task="clustering")


def _som(rows=2, columns=2, **params):
    torch.manual_seed(0)
    return build(Net(name="som", params=SOMConfig(rows=rows, columns=columns, **params), input_shape=(3,), num_outputs=1,
                     task="clustering"))


def test_batch_som_epoch_is_the_hand_computed_update():
    som = _som(sigma=1.0, sigma_end=0.5, rate=0.8, rate_end=0.4)
    x = np.random.default_rng(4).uniform(size=(10, 3)).astype(np.float32)
    w = _np(som.weights)
    d = ((x[:, None, :] - w[None]) ** 2).sum(2)
    bmu, second = d.argsort(1)[:, 0], d.argsort(1)[:, 1]
    grid = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)  # (column, row) of units 0..3 on a 2x2 map
    h = np.exp(-((grid[:, None] - grid[None]) ** 2).sum(2) / (2 * 1.0**2))  # epoch 1 of 3: sigma 1.0, rate 0.8
    won = np.eye(4)[bmu]  # rows x units
    target = (h @ won.T @ x) / (h @ won.sum(0))[:, None]
    qe, te = som.train_epoch(torch.from_numpy(x), 1, 3, SingleProcess())
    assert np.allclose(_np(som.weights), w + 0.8 * (target - w), atol=1e-6) and som.rate == pytest.approx(0.8)
    assert qe == pytest.approx(np.sqrt(d[np.arange(10), bmu]).sum(), rel=1e-5)
    # on a 2x2 rectangular map every unit touches every other (diagonals count, as in MiniSom): no topographic error
    assert te == 0 and np.all(np.abs(grid[bmu] - grid[second]).max(1) <= 1)
    assert som.schedule(3, 3) == pytest.approx((0.5, 0.4))


def test_hexagonal_map_neighbours_and_topographic_error():
    som = _som(rows=3, columns=3, topology="hexagonal")
    near = torch.cdist(som.positions, som.positions) <= som.adjacent
    assert near[4].sum().item() == 7  # the centre unit and its six neighbours
    som.weights.copy_(torch.zeros(9, 3))
    som.weights[0], som.weights[8] = torch.ones(3), torch.ones(3) * 1.01  # far apart on the map, close in data
    _, qe, te = som.quality(torch.ones(1, 3))
    assert te.item() == 1 and qe.item() == pytest.approx(0, abs=1e-3)


# --- on the small real slice -------------------------------------------------------------------------

def test_reconstruction_grid_shows_each_label_before_repeating_one():
    from dlpipe.tracking import one_per_label

    labels = np.array([4, 4, 4, 1, 1, 7, 4])  # a table stored class by class
    assert one_per_label(labels, 4).tolist() == [0, 3, 5, 1]
    assert one_per_label(labels[:2], 10).tolist() == [0, 1]


def test_conf_files_load():
    from dlpipe.config import load_config

    ae, som = load_config("conf/fashion_autoencoder.yaml"), load_config("conf/fashion_som.yaml")
    assert (ae.model.name, ae.model.task, ae.model.autoencoder.code, ae.registry.metric) == ("autoencoder", "reconstruction", 30, "test_mse")
    assert (som.model.name, som.model.task, som.model.som.rows * som.model.som.columns) == ("som", "clustering", 400)


def _configured(cfg, root, name: str, model_name: str, **params):
    """The small slice's config for this model, with its own MLflow store (the session's is the
    end-to-end test's, whose evaluate takes the latest training run) and its own predictions table."""
    model = dataclasses.replace(cfg.model, name=name, task=REGISTRY[name].tasks[0],
                                **{name: dataclasses.replace(getattr(cfg.model, name), **params)})
    return dataclasses.replace(
        cfg, model=model, train=dataclasses.replace(cfg.train, backend="local", epochs=2, run_name=model_name, checkpoint_every=0),
        registry=dataclasses.replace(cfg.registry, model_name=model_name),
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=mlflow_store(root), artifact_root=f"{root}/mlartifacts"))


@pytest.fixture(scope="module")
def trained(spark, prepared_small, tmp_path_factory):
    """An autoencoder and a map trained by the train stage on the small slice; the autoencoder evaluated
    (registered as small_ae@champion; the map's served model is its run's)."""
    cfg, prepared = prepared_small
    out, root = {}, tmp_path_factory.mktemp("unsupervised")
    for name, model_name, params in (("autoencoder", "small_ae", dict(encoder=[32], code=3)),
                                     ("som", "small_som", dict(rows=4, columns=5, topology="hexagonal"))):
        c = _configured(cfg, root, name, model_name, **params)
        run = stage("train", spark, c)
        out[name] = (c, run, stage("evaluate", spark, with_run(c, run["run_id"])) if name == "autoencoder" else None)
    return out, prepared


@pytest.mark.slow
def test_train_logs_per_epoch_figures_and_plots_and_evaluate_registers(trained):
    models, _ = trained
    for name, figure, plots in (("autoencoder", "mse", {"reconstructions", "codes_2d"}), ("som", "te", {"u_matrix", "hit_map"})):
        cfg, run, evaluated = models[name]
        client = MlflowClient(cfg.mlflow.tracking_uri)
        logged = {a.path for a in client.list_artifacts(run["run_id"], "plots")}
        assert {f"plots/{p}.png" for p in plots | {"training_curves"}} <= logged, name
        assert len(client.get_metric_history(run["run_id"], f"val_{figure}")) == 2, name
    evaluated = models["autoencoder"][2]  # no threshold for a model trained without a target
    assert evaluated["metrics"]["test_mse"] > 0 and evaluated["champion"] and evaluated["model_uri"].startswith("models:/small_ae/")
    losses = [m.value for m in MlflowClient(models["som"][0].mlflow.tracking_uri).get_metric_history(models["som"][1]["run_id"], "loss")]
    assert losses[1] < losses[0]  # the quantization error falls


CONSUMER = WITHOUT_DLPIPE + textwrap.dedent("""
    import mlflow, pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])
    rows = json.loads(sys.argv[2])
    out = {}
    for name, uri in (("small_ae", "models:/small_ae@champion"), ("small_som", sys.argv[3])):
        frame = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"pixels": rows}))
        out[name] = {c: [v.tolist() if hasattr(v, "tolist") else v for v in frame[c]] for c in frame.columns}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_pyfunc_returns_code_error_and_bmu_without_dlpipe(trained, tmp_path):
    from dlpipe.tracking import load_net

    models, prepared = trained
    cfg = models["autoencoder"][0]
    rows = read_table(prepared, "test").head(4)
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(script), cfg.mlflow.tracking_uri,
                           json.dumps([list(map(float, p)) for p in rows["pixels"]]), models["som"][1]["model_uri"]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    x = torch.tensor(np.stack(rows["pixels"].to_numpy()), dtype=torch.float32).view(4, 1, 28, 28)
    ae, _ = load_net("models:/small_ae@champion")
    with torch.no_grad():
        code, error = ae.features(x).numpy(), (ae(x) - x).pow(2).flatten(1).mean(1).numpy()
    assert np.allclose(out["small_ae"]["code"], code, atol=1e-5) and np.array(out["small_ae"]["code"]).shape == (4, 3)
    assert np.allclose(out["small_ae"]["reconstruction_error"], error, rtol=1e-5)
    som, _ = load_net(models["som"][1]["model_uri"])
    with torch.no_grad():
        d2 = som(x).numpy()
    bmu = d2.argmin(1)
    assert out["small_som"]["bmu"] == bmu.tolist() and out["small_som"]["bmu_row"] == (bmu // 5).tolist()
    assert out["small_som"]["bmu_col"] == (bmu % 5).tolist()
    assert np.allclose(out["small_som"]["quantization_error"], np.sqrt(d2.min(1)), rtol=1e-5)


@pytest.mark.slow
def test_anomalies_command_ranks_a_planted_outlier_first(spark, trained, tmp_path):
    from dlpipe import cli, lake

    models, prepared = trained
    cfg = models["autoencoder"][0]
    rows = read_table(prepared, "test").head(30)[["key", "label", "pixels"]]
    white = np.ones(28 * 28, np.float32)  # no garment on a black background looks like this
    rows = pd.concat([rows, pd.DataFrame({"key": ["planted"], "label": [0], "pixels": [white]})], ignore_index=True)
    rows["pixels"] = [list(map(float, p)) for p in rows["pixels"]]
    uri = str(tmp_path / "suspects")
    lake.write_table(spark.createDataFrame(rows, "key string, label int, pixels array<float>"), uri)
    summary_file = tmp_path / "anomalies.json"
    args = ["anomalies", "--model", "models:/small_ae@champion", "--table", f"{uri}@0", "--top", "5",
            "--summary", str(summary_file), "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
            "--set", f"mlflow.artifact_root={cfg.mlflow.artifact_root}", "--set", "spark.master=local[2]"]
    assert cli.main(args) == 0
    summary = json.loads(summary_file.read_text())
    errors = [r["reconstruction_error"] for r in summary["top"]]
    assert summary["rows"] == 31 and summary["table"] == {"uri": uri, "version": 0} and len(errors) == 5
    assert summary["top"][0]["key"] == "planted" and errors == sorted(errors, reverse=True)
    assert errors[-1] >= summary["mean_error"] * 0.5 and summary["model_uri"].startswith("models:/small_ae/")


@pytest.mark.slow
def test_batch_som_on_two_horovod_workers_equals_one_worker(spark, tmp_path):
    """Each worker sums its BMU statistics and one allreduce combines them: the epochs of 2 real
    Horovod workers on halves of the rows are the epochs of 1 worker on all of them."""
    from dlpipe.launchers import TrainTask, launch
    from tests.test_distributed import _files

    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(c, 0.1, (100, 1, 2, 2)) for c in (0.2, 0.8)]).astype(np.float32)
    y = np.repeat([0, 1], 100)
    task = TrainTask(net=Net(name="som", params=SOMConfig(rows=3, columns=4, sigma_end=0.3), input_shape=(1, 2, 2),
                             num_outputs=1, task="clustering"),
                     train=TrainConfig(epochs=2, batch_size=16, checkpoint_every=0),
                     train_files=_files(tmp_path, "train", x, y, row_groups=4), val_files=_files(tmp_path, "val", x[::5], y[::5]),
                     threads=1)
    one, two = launch(spark, task, "local", 1), launch(spark, task, "horovod", 2)
    assert (two["backend"], two["world_size"], one["world_size"]) == ("horovod", 2, 1)
    assert torch.allclose(one["state_dict"]["weights"], two["state_dict"]["weights"], rtol=0, atol=1e-6)
    torch.manual_seed(task.train.seed)
    start = build(task.net).weights  # the map both started from
    assert not torch.allclose(start, one["state_dict"]["weights"], atol=1e-2)
    for a, b in zip(one["history"], two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["te"] == pytest.approx(b["te"], abs=1e-9)


@pytest.mark.slow
def test_score_of_an_autoencoder_writes_its_code_and_error(spark, trained):
    """`dlpipe score` writes what the model gives: for an autoencoder its code and reconstruction
    error per row, not a class prediction."""
    import deltalake

    models, prepared = trained
    cfg = models["autoencoder"][0]
    summary = stage("score", spark, dataclasses.replace(  # its own <name>_predictions: a code is not a class
        cfg, data=dataclasses.replace(cfg.data, name=f"{cfg.data.name}_ae"),
        score=dataclasses.replace(cfg.score, model_uri="models:/small_ae@champion")))
    out = deltalake.DeltaTable(summary["predictions"]["uri"], version=summary["predictions"]["version"]).to_pandas()
    assert {"code", "reconstruction_error"} <= set(out.columns) and "prediction" not in out.columns
    assert len(out) == prepared["tables"]["test"]["rows"] and out["rejected_reason"].isna().all()
    assert len(out["code"].iloc[0]) == 3 and (out["reconstruction_error"] > 0).all()
