"""RBM for collaborative filtering (Salakhutdinov, Mnih & Hinton 2007). Each user is one RBM
whose visible units are the movies that user rated, each a softmax over the K rating levels
(one-hot v_ik); every user's RBM shares the weights W_ikj of an item, level and hidden unit, the
visible biases b_ik and the hidden biases c_j. A movie the user did not rate has no visible unit:
its one-hot row is all zero, so it adds nothing to the hidden input, the free energy

    F(v) = -sum_ik v_ik b_ik - sum_j softplus(c_j + sum_ik v_ik W_ikj)

or its gradient; the Gibbs chain's visible softmax is masked to the rated movies (CD-k as in
dl.models.rbm: loss = mean F(data) - mean F(chain)). A batch of users is a batch of these RBMs.

Prediction (`forward`): from the user's known ratings, p(h | v), then for every movie the
softmax over levels of b_ik + sum_j p_j W_ikj, and the expected rating sum_k level_k p_ik.
Input: a vector over items of ratings, 0 = unrated; min_rating .. max_rating in steps of 1 (the
train stage sets them from data.ratings). `objective` while training: the user's own ratings;
while evaluating: x the user's known (train) ratings, y the held-out ones to predict.

`based: item` (I-RBM, as compared in the AutoRec paper, Sedhain et al. 2015) transposes the
matrix: one RBM per item whose visible units are the users who rated it, each a softmax over
levels, the weights shared by every item. It trains on the per-item vectors and is served to users
through dl.models.autorec.FoldIn, exactly as the item-based AutoRec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from dl.models.base import ModelSpec, ParamError, check_positive


@dataclass(frozen=True, kw_only=True)
class RBMCFConfig:
    hidden: int = 100
    k: int = 1  # Gibbs steps of CD-k
    based: Literal["user", "item"] = "user"  # one RBM per user over the items, or per item over the users
    min_rating: float = 1.0  # set from data.ratings by the train stage
    max_rating: float = 5.0

    def __post_init__(self):
        check_positive("hidden", self.hidden)
        check_positive("k", self.k)
        check_rating_range(self.min_rating, self.max_rating)


def check_rating_range(low: float, high: float) -> None:
    if low <= 0:
        raise ParamError("min_rating", f"expected ratings above 0 (0 marks an unrated item), got {low:g}")
    if high <= low:
        raise ParamError("max_rating", f"expected more than min_rating={low:g}, got {high:g}")


def masked_errors(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors over the rated entries of target, how many are rated)."""
    rated = target > 0
    return ((predicted - target) * rated).pow(2).sum(), rated.sum()


class RBMCF(nn.Module):
    def __init__(self, cfg: RBMCFConfig, input_shape: tuple[int, ...], num_outputs: int = 0):
        super().__init__()
        self.cfg = cfg
        items, levels = int(input_shape[0]), int(round(cfg.max_rating - cfg.min_rating)) + 1
        self.weight = nn.Parameter(0.01 * torch.randn(items, levels, cfg.hidden))
        self.visible_bias = nn.Parameter(torch.zeros(items, levels))
        self.hidden_bias = nn.Parameter(torch.zeros(cfg.hidden))
        self.register_buffer("levels", cfg.min_rating + torch.arange(levels, dtype=torch.float32), persistent=False)

    def one_hot(self, x: torch.Tensor) -> torch.Tensor:
        """users x items x levels; all zero for an unrated item (0 matches no level)."""
        return (x.round().unsqueeze(-1) == self.levels).float()

    def hidden_p(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.hidden_bias + torch.einsum("bik,ikh->bh", v, self.weight))

    def visible_p(self, h: torch.Tensor) -> torch.Tensor:
        """users x items x levels: the softmax over levels of every item."""
        return torch.softmax(self.visible_bias + torch.einsum("bh,ikh->bik", h, self.weight), dim=-1)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        hidden = F.softplus(self.hidden_bias + torch.einsum("bik,ikh->bh", v, self.weight)).sum(1)
        return -(v * self.visible_bias).sum((1, 2)) - hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expected rating of every item, users x items, from the known ratings x."""
        return (self.visible_p(self.hidden_p(self.one_hot(x))) * self.levels).sum(-1)

    def gibbs(self, v0: torch.Tensor, rated: torch.Tensor) -> torch.Tensor:
        """The last visible probabilities of k Gibbs steps from v0, on the rated items only."""
        v = v0
        with torch.no_grad():
            for step in range(self.cfg.k):
                p = self.visible_p(torch.bernoulli(self.hidden_p(v))) * rated
                v = p if step == self.cfg.k - 1 else \
                    F.one_hot(torch.multinomial(p.reshape(-1, p.shape[-1]) + (1 - rated.reshape(-1, 1)), 1).squeeze(1),
                              p.shape[-1]).view_as(p).float() * rated
        return v

    def objective(self, x: torch.Tensor, y: torch.Tensor):
        """Training: (mean F(data) - mean F(chain), squared error of the reconstructed ratings, rated
        entries). Evaluating: x known, y held out: (MSE on y, its squared error, its rated entries)."""
        if not self.training:
            sse, n = masked_errors(self(x), y)
            return sse / n.clamp(min=1), sse.detach(), n
        v0 = self.one_hot(x)
        rated = (x > 0).unsqueeze(-1).float()
        loss = self.free_energy(v0).mean() - self.free_energy(self.gibbs(v0, rated).detach()).mean()
        with torch.no_grad():
            sse, n = masked_errors(self(x), x)
        return loss, sse, n


SPEC = ModelSpec(name="rbm_cf", config=RBMCFConfig, build=RBMCF, tasks=("recommendation",), inputs=("ratings",))
