"""The model registry. Every module in this package that defines `SPEC` is a model, found by its
file: adding a model means adding one file here (an `nn.Module`, its frozen config dataclass with
its defaults, and a `SPEC`); `model.name: <name>` in a conf file picks it (docs/models.md).

Every model is `head(features(x))`: `features` ends in the layer before the classifier (the
embedding used for image similarity, the part `train.freeze: features` keeps fixed) and `head`
is the last linear layer, replaced when a model is fine-tuned for a new label set."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from dl.models.base import TASKS, ModelSpec, Net, ParamError, activation, check_fraction, check_positive  # noqa: F401


def _discover() -> dict[str, ModelSpec]:
    found = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name == "base":
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SPEC", None)
        if isinstance(spec, ModelSpec):
            found[spec.name] = spec
    return found


def build(net: Net) -> nn.Module:
    if net.name not in REGISTRY:
        raise ValueError(f"unknown model {net.name!r} (registered: {', '.join(REGISTRY)})")
    # classes | the vocabulary (a language model) | the forecast horizon (a regression model may predict more than one value)
    outputs = net.num_outputs if net.task in ("classification", "language_model", "regression") else 1
    return REGISTRY[net.name].build(net.params, tuple(net.input_shape), outputs)


REGISTRY: dict[str, ModelSpec] = _discover()

from dl.models.cnn import CNN, CNNConfig, ConvBlock  # noqa: E402  (re-exported)
from dl.models.mlp import MLP, MLPConfig  # noqa: E402

__all__ = ["CNN", "CNNConfig", "ConvBlock", "MLP", "MLPConfig", "REGISTRY", "ModelSpec", "Net", "ParamError", "TASKS",
           "activation", "build", "check_fraction", "check_positive"]
