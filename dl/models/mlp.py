"""Multilayer perceptron: the chained weighted sums and nonlinearities of the course notes. ReLU,
sigmoid or tanh; images are flattened, table rows are used as they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from dl.models.base import ModelSpec, activation, check_fraction, check_positive


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    dropout: float = 0.2  # after each hidden layer
    batch_norm: bool = False  # on the input (learned standardization of table columns) and after each hidden layer

    def __post_init__(self):
        check_positive("hidden", self.hidden)
        check_fraction("dropout", self.dropout)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        self.cfg = cfg
        size = int(np.prod(input_shape))
        layers: list[nn.Module] = [nn.Flatten()]
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(size))
        for h in cfg.hidden:
            layers += [nn.Linear(size, h), *([nn.BatchNorm1d(h)] if cfg.batch_norm else []), activation(cfg.activation)]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            size = h
        self.features = nn.Sequential(*layers)
        self.embedding_size = size
        self.head = nn.Linear(size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


SPEC = ModelSpec(name="mlp", config=MLPConfig, build=MLP, tasks=("classification", "regression"), inputs=("image", "table"))
