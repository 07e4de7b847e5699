"""Occlusion heatmaps: the informative region of an image is where covering it hurts most; the
`explain` command writes the overlay as a PNG and evaluate logs a grid of them."""

import json
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from dl.train import TrainConfig, fit
from dlpipe import cli, errors
from dlpipe.occlusion import occlusion, torch_proba
from tests.test_train import tiny_net


def _squares(n, seed):
    """Class 1: a bright 5x5 square at the top left of a noisy 12x12 image; class 0: noise only."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.2, (n, 1, 12, 12)).astype(np.float32)
    x[y == 1, 0, 0:5, 0:5] += 0.8
    return x, y


def test_occluding_the_informative_region_lowers_the_probability_most():
    """Covering the square of a class-1 image drops p(class 1) far more than covering background."""
    from dl.models import build

    torch.manual_seed(0)
    model = build(tiny_net(conv_channels=(8,), hidden=16, dropout=0.0))
    fit(model, _squares(256, 1), _squares(64, 2), TrainConfig(epochs=3, batch_size=32, lr=0.01), log=lambda line: None)
    x, y = _squares(20, 3)
    image = x[np.flatnonzero(y == 1)[0]]
    heat, target, p = occlusion(torch_proba(model), image, patch=6, stride=2, fill=0.1)
    assert target == 1 and p > 0.9 and heat.shape == (12, 12)
    informative = heat[0:5, 0:5].mean()
    background = heat[7:12, 7:12].mean()
    assert informative > background + 0.2


def test_explain_command_writes_the_overlay_and_evaluate_logged_a_grid(registered_small, tmp_path, capsys):
    cfg, evaluated = registered_small
    image = sorted(Path(cfg.paths.landing).glob("*/*.png"))[0]
    out = tmp_path / "heatmap.png"
    args = ["explain", "--model", "models:/small_cnn@champion", "--image", str(image), "--out", str(out),
            "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", "--set", f"mlflow.artifact_root={cfg.mlflow.artifact_root}"]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["predicted"] in cfg.data.classes
    assert 0 <= summary["probability"] <= 1
    logged = [a.path for a in MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(evaluated["run_id"], "plots")]
    assert "plots/occlusion_heatmaps.png" in logged


def test_explain_names_a_missing_image(registered_small, tmp_path, capsys):
    cfg, _ = registered_small
    args = ["explain", "--model", "models:/small_cnn@champion", "--image", str(tmp_path / "nope.png"),
            "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"]
    assert cli.main(args) == errors.EXIT_MISSING_INPUT  # one line, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"dlpipe: error: image {tmp_path / 'nope.png'} does not exist"
