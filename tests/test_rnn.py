"""Recurrent nets (dl/models/rnn.py): packed batches (padding never changes a sequence's output),
gradient clipping in the one loop, an LSTM on 2 Horovod workers equal to 1 worker with the global
batch, the raw-text pyfunc loaded where dlpipe cannot be imported, and `dlpipe generate`."""

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dl.models import Net, build
from dl.models.rnn import RNNConfig
from dl.train import SingleProcess, TrainConfig, fit
from dlpipe.config import ConfigError, load_config
from tests.conftest import WITHOUT_DLPIPE, mlflow_store


def _net(task="classification", outputs=2, length=12, **params) -> Net:
    params = {"hidden": 8, "embedding": 6, "vocab_size": 30} | params
    return Net(name="rnn", params=RNNConfig(**params), input_shape=(length,), num_outputs=outputs, task=task)


def _ids(n=64, length=12, vocab=30, seed=0):
    """Right-padded id rows of random lengths 1..length; label: does token 2 occur (a learnable rule)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, length), np.float32)
    for i, k in enumerate(rng.integers(1, length + 1, n)):
        x[i, :k] = rng.integers(2, vocab, k)
    return x, (x == 2).any(1).astype(np.int64)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_change_a_sequences_output(cell, bidirectional):
    torch.manual_seed(0)
    model = build(_net(cell=cell, bidirectional=bidirectional, layers=2, dropout=0.2)).eval()
    short = torch.tensor([[5, 6, 7], [8, 9, 10]])
    padded = torch.cat([short, torch.zeros(2, 9, dtype=torch.long)], 1)
    mixed = torch.stack([padded[0], torch.arange(2, 14)])  # batched with a full-length row
    assert torch.allclose(model(short), model(padded), atol=1e-6)
    assert torch.allclose(model(short)[0], model(mixed)[0], atol=1e-6)
    scripted = torch.jit.script(model)  # what the pyfunc serves
    assert torch.allclose(scripted(padded), model(padded), atol=1e-6)


def test_language_model_steps_ignore_padding_and_lstm_forget_bias():
    torch.manual_seed(0)
    model = build(_net(task="language_model", outputs=30, cell="lstm", forget_bias=1.0)).eval()
    seq = torch.tensor([[4, 5, 6, 7]])
    out_short, out_padded = model(seq), model(torch.cat([seq, torch.zeros(1, 8, dtype=torch.long)], 1))
    assert out_short.shape == (1, 4, 30) and torch.allclose(out_short, out_padded[:, :4], atol=1e-6)
    bias = model.recurrence.net.bias_ih_l0 + model.recurrence.net.bias_hh_l0
    assert torch.allclose(bias[8:16], torch.ones(8))  # forget gate (gates: input, forget, cell, output)
    with pytest.raises(ValueError, match="bidirectional"):
        build(_net(task="language_model", outputs=30, bidirectional=True))


def test_forecast_is_scaled_back_and_learns_a_sine():
    torch.manual_seed(0)
    t = np.arange(400, dtype=np.float32)
    series = 100 + 50 * np.sin(t / 5)
    x = np.stack([series[i:i + 20] for i in range(300)])
    y = np.stack([series[i + 20:i + 23] for i in range(300)])
    model = build(Net(name="rnn", params=RNNConfig(cell="gru", hidden=16), input_shape=(20,), num_outputs=3, task="regression"))
    history = fit(model, (x[:240], y[:240]), (x[240:], y[240:]), TrainConfig(epochs=4, batch_size=16, lr=0.01),
                  task="regression", log=lambda _: None)
    assert model(torch.from_numpy(x[:2])).shape == (2, 3)
    assert history[-1]["val_mae"] < 0.5 * history[0]["val_mae"] and history[-1]["val_mae"] < 10  # in the series' units


def _one_sgd_step(clip: float) -> float:
    """Norm of the parameter change of one plain SGD step (lr 1) on one batch."""
    torch.manual_seed(0)
    model = build(_net(cell="rnn"))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = _ids(32)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1.0, optimizer="sgd", lr_schedule="constant", shuffle=False,
                      clip_grad_norm=clip)
    fit(model, (x, y), (x[:4], y[:4]), cfg, SingleProcess(), log=lambda _: None)
    return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())


def test_clip_grad_norm_bounds_the_step():
    free, clipped = _one_sgd_step(0.0), _one_sgd_step(0.05)
    assert free > 0.05 and clipped == pytest.approx(0.05, rel=1e-4)  # lr 1: the step is the clipped gradient


def test_generate_is_deterministic_at_temperature_0_and_the_served_loop_is_the_same():
    from dlpipe.pyfunc_sequence import sample as served_sample

    torch.manual_seed(0)
    model = build(_net(task="language_model", outputs=30, cell="gru")).eval()
    a, b = model.generate([3, 4, 5], 20, temperature=0), model.generate([3, 4, 5], 20, temperature=0)
    assert a == b and len(a) == 20 and 0 not in a
    assert served_sample(torch.jit.script(model), [3, 4, 5], 20, 0.0, 0) == a
    assert served_sample(torch.jit.script(model), [3, 4, 5], 20, 1.0, 7) == model.generate([3, 4, 5], 20, 1.0, seed=7)


@pytest.mark.parametrize("override, message", [
    ("model.rnn.cell=tcn", "config key 'model.rnn.cell': expected one of ['rnn', 'lstm', 'gru'], got 'tcn'"),
    ("model.rnn.dropout=1", "config key 'model.rnn.dropout': expected a number in [0, 1), got 1"),
    ("model.rnn.hidden=0", "config key 'model.rnn.hidden': expected positive integers"),
    ("train.clip_grad_norm=-1", "config key 'train.clip_grad_norm': expected a non-negative number"),
    ("model.task=regression", "config key 'model.task': on data.kind=text expected one of ['classification', 'language_model', 'embedding']"),
    ("data.kind=images", "config key 'data.kind': model rnn reads text or timeseries data, got 'images'"),
])
def test_bad_rnn_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("conf/reviews_sentiment.yaml", [override])
    assert message in str(err.value)


CONSUMER = WITHOUT_DLPIPE + textwrap.dedent("""
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    out = model.predict(pd.DataFrame({"text": json.loads(sys.argv[2])}))
    try:
        model.predict(pd.DataFrame({"text": ["...", None]}))
        refused = ""
    except Exception as exc:
        refused = str(exc)
    print(json.dumps({"probabilities": [p.tolist() for p in out["probabilities"]],
                      "label_name": list(out["label_name"]), "refused": refused}))
""")

VOCAB = ["<pad>", "<unk>", "great", "fit", "love", "it", "bad", "small", "the", "dress"]


def _log(tmp_path, net, model, text, example):
    from dlpipe import tracking
    from dlpipe.config import MlflowConfig

    tracking.setup(MlflowConfig(tracking_uri=mlflow_store(tmp_path), artifact_root=str(tmp_path / "art")))
    with mlflow.start_run():
        return tracking.log_sequence_model(model, net, ["0", "1"] if net.task == "classification" else [], text,
                                           example, {}).model_uri


@pytest.mark.slow
def test_pyfunc_takes_raw_text_without_dlpipe(tmp_path):
    torch.manual_seed(0)
    net = _net(vocab_size=len(VOCAB), length=6, bidirectional=True)
    model = build(net).eval()
    text = {"vocab": VOCAB, "unit": "word", "lowercase": True, "pattern": r"\w+(?:'\w+)*"}
    uri = _log(tmp_path, net, model, text, ["Love it"])
    rows = ["Love the dress, GREAT fit!", "too small; zebra", "bad bad bad bad bad bad bad bad"]
    proc = subprocess.run([sys.executable, "-I", "-c", CONSUMER, uri, json.dumps(rows)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = torch.tensor([[4, 8, 9, 2, 3, 0], [1, 7, 1, 0, 0, 0], [6] * 6])  # lowercased, <unk> = 1, truncated to 6
    with torch.no_grad():
        expected = torch.softmax(model(ids), 1).numpy()
    assert np.allclose(out["probabilities"], expected, atol=1e-5)
    assert "2 of 2 input rows rejected (row 0: no token; row 1: expected a string, got NoneType)" in out["refused"]


@pytest.mark.slow
def test_dlpipe_generate_through_the_cli(tmp_path, capsys):
    from dlpipe.cli import main

    torch.manual_seed(0)
    chars = ["<pad>", "<unk>", *"abcde "]
    net = _net(task="language_model", vocab_size=len(chars), outputs=len(chars), cell="lstm")
    model = build(net).eval()
    uri = _log(tmp_path, net, model, {"vocab": chars, "unit": "char", "lowercase": True, "pattern": ""}, ["abc"])
    args = ["generate", "--model", uri, "--prompt", "Bad", "--length", "15", "--temperature", "0",
            "--set", f"mlflow.tracking_uri={mlflow_store(tmp_path)}"]
    runs = []
    for _ in range(2):
        assert main(args) == 0
        runs.append(json.loads(capsys.readouterr().out))
    expected = "".join(chars[i] for i in model.generate([3, 2, 5], 15, temperature=0))
    assert runs[0]["generated"] == runs[1]["generated"] == expected and runs[0]["text"] == "Bad" + expected
    assert main([*args[:5], "--length=-1", *args[7:]]) == 2
    assert "--length: expected a non-negative number" in capsys.readouterr().err


def _text_files(tmp_path, name, x, y):
    table = pa.table({"label": pa.array(y, pa.int32()), "ids": pa.array([list(map(int, r)) for r in x], pa.list_(pa.int32()))})
    pq.write_table(table, tmp_path / f"{name}.parquet")
    return [str(tmp_path / f"{name}.parquet")]


@pytest.mark.slow
def test_lstm_on_two_horovod_workers_matches_one_worker_with_the_global_batch(spark, tmp_path):
    import horovod.torch  # noqa: F401  (a missing Horovod must fail, not skip)

    from dlpipe.launchers import TrainTask, launch

    x, y = _ids(128, seed=1)
    vx, vy = _ids(32, seed=2)
    train_files, val_files = _text_files(tmp_path, "train", x, y), _text_files(tmp_path, "val", vx, vy)

    def task(batch):
        fit_cfg = TrainConfig(epochs=2, batch_size=batch, lr=0.5, optimizer="sgd", shuffle=False, clip_grad_norm=0.5)
        return TrainTask(net=_net(cell="lstm", layers=2, bidirectional=True), train=fit_cfg, train_files=train_files,
                         val_files=val_files, threads=1)

    single = launch(spark, task(32), "local", 1)
    double = launch(spark, task(16), "horovod", 2)
    assert double["world_size"] == 2 and double["backend"] == "horovod"
    assert all(torch.allclose(single["state_dict"][k], double["state_dict"][k], atol=1e-5) for k in single["state_dict"])
    assert double["history"][-1]["loss"] < double["history"][0]["loss"]


def test_served_bits_per_token_equal_the_training_figure_and_bad_rows_have_reasons():
    from dlpipe.pyfunc_sequence import SequenceModel

    torch.manual_seed(0)
    model = build(_net(task="language_model", outputs=30, cell="lstm")).eval()
    served = SequenceModel.__new__(SequenceModel)
    served.module, served.width, served.column = torch.jit.script(model), 12, "text"
    x, _ = _ids(40, seed=3)
    x = x[(x != 0).sum(1) >= 2]  # a one-token row has nothing to predict (NaN when served)
    ids = torch.from_numpy(x).long()
    _, figure = model.objective(ids, torch.zeros(len(ids)))
    bits = served.bits([[int(i) for i in row if i] for row in x], batch=7)  # batches of mixed lengths
    assert np.mean(bits) == pytest.approx(float(figure) / len(x), rel=1e-5)
    assert np.isnan(served.bits([[5]])[0])
    served.lowercase, served.unit, served.pattern = True, "word", __import__("re").compile(r"\w+")
    assert served.row_problems(["fine", "?!", None]) == [None, "no token", "expected a string, got NoneType"]
    served.column = "history"
    assert served.row_problems([[1.0] * 12, [1.0] * 3, [float("nan")] * 12, None]) == [
        None, "3 values", "a NaN or infinite value", "no value"]
