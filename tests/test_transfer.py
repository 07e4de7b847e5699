"""Transfer learning: train.init_from loads a registered model's weights, replaces the head for
the new label set, and with train.freeze=features only the head changes."""

import dataclasses

import pytest
import torch

from dl.models import build
from dlpipe import modeling
from dlpipe.tracking import load_net
from tests.conftest import stage


def _replace(cfg, **sections):
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def test_init_from_loads_a_registered_model_and_frozen_layers_do_not_change(spark, registered_small):
    cfg, evaluated = registered_small
    classes = cfg.data.classes
    tuned = _replace(cfg, data={"select_classes": classes[5:], "label_fraction": 0.5},
                     train={"init_from": "models:/small_cnn@champion", "freeze": "features", "epochs": 3,
                            "run_name": "small_cnn_tuned"},
                     registry={"model_name": "small_cnn_tuned"})
    trained = stage("train", spark, tuned)
    source, _ = load_net(f"models:/small_cnn/{evaluated['model_version']}")
    result, meta = load_net(trained["model_uri"])
    assert meta["classes"] == classes[5:] and result.head[-1].out_features == 5
    before, after = source.state_dict(), result.state_dict()
    features = [k for k in after if k.startswith("features.")]
    assert features and all(torch.equal(before[k], after[k]) for k in features)  # weights and batch-norm statistics
    torch.manual_seed(tuned.train.seed)  # the fresh head the worker started from
    fresh = build(meta["net_obj"]).state_dict()
    assert not torch.equal(fresh["head.1.weight"], after["head.1.weight"])
    assert trained["metrics"]["loss"] > 0

    evaluated_tuned = stage("evaluate", spark, _replace(tuned, evaluate={"run_id": trained["run_id"]}))
    assert evaluated_tuned["metrics"]["test_rows"] > 0  # the test rows of the five new classes only


def test_init_from_a_different_architecture_is_refused(spark, registered_small):
    cfg, evaluated = registered_small
    other = _replace(cfg, train={"init_from": "models:/small_cnn@champion"},
                     model={"cnn": dataclasses.replace(cfg.model.cnn, hidden=[8])})
    net = modeling.image_net(other.model, other.data)
    with pytest.raises(ValueError, match="train.init_from=models:/small_cnn@champion .* must match"):
        modeling.pretrained_state(other.train.init_from, net)
