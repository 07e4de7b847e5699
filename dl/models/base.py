"""What every model file shares: its spec, the description of a built net, the hyperparameter
errors and small layer helpers. Model files import these from here, never from dl.models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

# classification: logits per class; regression: one value; reconstruction (autoencoders) and clustering
# (self-organizing maps): no target, the model owns its objective; language_model (recurrent nets): the next token;
# recommendation (collaborative filtering): a vector of ratings over items in (0 = unrated), the predicted ratings out;
# embedding (word2vec): no target, the model learns vectors of the tokens from their neighbours
TASKS = ("classification", "regression", "reconstruction", "clustering", "language_model", "recommendation", "embedding")


class ParamError(ValueError):
    """A bad hyperparameter; `field` names it so the config error can name the whole key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str  # model.name in the config; its hyperparameters live under model.<name>
    config: type  # frozen dataclass of hyperparameters
    build: Callable[[Any, tuple[int, ...], int], nn.Module]  # (config, input shape, outputs) -> module
    tasks: tuple[str, ...]  # what its output can be trained for
    # "image" (pixels, channels x height x width), "table" (features), "text" (ids, token ids padded with 0),
    # "series" (history, a window of values), "ratings" (a user's ratings over all items, 0 = unrated)
    inputs: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Net:
    """Everything needed to rebuild a trained net: saved with every logged model."""

    name: str
    params: Any  # the model's config dataclass
    input_shape: tuple[int, ...]  # per example: (channels, height, width) or (features,)
    num_outputs: int  # classes, or 1 for regression
    task: str

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dataclasses.asdict(self.params), "input_shape": list(self.input_shape),
                "num_outputs": self.num_outputs, "task": self.task}


def activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[name]()


def check_fraction(field: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ParamError(field, f"expected a number in [0, 1), got {value}")


def check_positive(field: str, values) -> None:
    for v in values if isinstance(values, (list, tuple)) else [values]:
        if v <= 0:
            raise ParamError(field, f"expected positive integers, got {values}")
