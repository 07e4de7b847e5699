"""AutoRec (Sedhain, Menon, Sanner & Xie 2015): an autoencoder of rating vectors, r -> W sigmoid(V r + mu) + b,
trained on the observed ratings only: the loss is the squared error over the rated entries (an
unrated entry, 0, is an input of 0 and never a target); L2 regularization is train.weight_decay.

`based: item` (I-AutoRec, the paper's better variant and the default of conf/movielens_autorec.yaml):
one example is an item's ratings over every user, so the net's width is the number of users. It is
served to users through FoldIn, which carries the training matrix: a user's known ratings replace
their column of it, the whole matrix goes through the net, and that user's column comes back; a user
outside the matrix cannot be scored. `based: user` (U-AutoRec): one example is a user's ratings over
every item, so any user is scored from the ratings they give.
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
    based: Literal["user", "item"] = "user"  # what one example is: a user's ratings of every item, or an item's of every user
    min_rating: float = 1.0  # set from data.ratings by the train stage
    max_rating: float = 5.0

    def __post_init__(self):
        check_positive("hidden", self.hidden)
        check_rating_range(self.min_rating, self.max_rating)


class AutoRec(nn.Module):
    def __init__(self, cfg: AutoRecConfig, input_shape: tuple[int, ...], num_outputs: int = 0):
        super().__init__()
        self.cfg = cfg
        width = int(input_shape[0])  # items (user-based) or users (item-based)
        self.features = nn.Sequential(nn.Linear(width, cfg.hidden), activation(cfg.activation))
        self.decoder = nn.Linear(cfg.hidden, width)
        self.embedding_size = cfg.hidden

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ratings from the known ones x, one row per example (a user, or an item)."""
        return self.reconstruct(x).clamp(self.cfg.min_rating, self.cfg.max_rating)

    def objective(self, x: torch.Tensor, y: torch.Tensor):
        """(loss, squared error, rated entries) of the ratings y from the known x: the user's own
        ratings while training (y is x), the held-out ones while evaluating."""
        sse, n = masked_errors(self.reconstruct(x) if self.training else self(x), y)
        return sse / n.clamp(min=1), sse.detach(), n


class FoldIn(nn.Module):
    """An item-based AutoRec served to users: forward(x, users) -> users x items, the predicted
    ratings of the users at the positions `users` of the training matrix `known` (users x items)
    given their known ratings x (which replace their rows of it)."""

    def __init__(self, net: AutoRec, known: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("known", known)

    def forward(self, x: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        matrix = self.known.index_put((users,), x)
        return self.net(matrix.t())[:, users].t()


SPEC = ModelSpec(name="autorec", config=AutoRecConfig, build=AutoRec, tasks=("recommendation",), inputs=("ratings",))
