"""AutoRec (Sedhain, Menon, Sanner & Xie 2015): an autoencoder of rating vectors, r -> W sigmoid(V r + mu) + b,
trained on the observed ratings only: the loss is the squared error over the rated entries (an
unrated entry, 0, is an input of 0 and never a target); L2 regularization is train.weight_decay.

This is the user-based variant (U-AutoRec): one example is a user's ratings over all items, so a
user the model never saw is scored from the ratings they give (the pyfunc's contract). The
item-based variant (I-AutoRec, better in the paper) takes an item's ratings over all users and so
cannot score a user outside its training matrix; it is not built here (docs/models.md).
Predictions are clipped to [min_rating, max_rating] (the train stage sets them from data.ratings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dl.models.base import ModelSpec, activation, check_positive
from dl.models.rbm_cf import check_rating_range, masked_errors


@dataclass(frozen=True, kw_only=True)
class AutoRecConfig:
    hidden: int = 500
    activation: Literal["sigmoid", "relu", "tanh"] = "sigmoid"  # the encoder's; the decoder is linear
    min_rating: float = 1.0  # set from data.ratings by the train stage
    max_rating: float = 5.0

    def __post_init__(self):
        check_positive("hidden", self.hidden)
        check_rating_range(self.min_rating, self.max_rating)


class AutoRec(nn.Module):
    def __init__(self, cfg: AutoRecConfig, input_shape: tuple[int, ...], num_outputs: int = 0):
        super().__init__()
        self.cfg = cfg
        items = int(input_shape[0])
        self.features = nn.Sequential(nn.Linear(items, cfg.hidden), activation(cfg.activation))
        self.decoder = nn.Linear(cfg.hidden, items)
        self.embedding_size = cfg.hidden

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted rating of every item, users x items, from the known ratings x."""
        return self.reconstruct(x).clamp(self.cfg.min_rating, self.cfg.max_rating)

    def objective(self, x: torch.Tensor, y: torch.Tensor):
        """(loss, squared error, rated entries) of the ratings y from the known x: the user's own
        ratings while training (y is x), the held-out ones while evaluating."""
        sse, n = masked_errors(self.reconstruct(x) if self.training else self(x), y)
        return sse / n.clamp(min=1), sse.detach(), n


SPEC = ModelSpec(name="autorec", config=AutoRecConfig, build=AutoRec, tasks=("recommendation",), inputs=("ratings",))
