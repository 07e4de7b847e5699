"""Restricted Boltzmann machines and deep belief nets of the course notes.

An RBM has visible units v and binary hidden units h, joined by a weight matrix W (no links inside
a layer), with visible biases b and hidden biases c. Its free energy is

    F(v) = -b.v - sum_j softplus(c_j + W_j.v)            (Bernoulli visible units)
    F(v) = |v - b|^2 / 2 - sum_j softplus(c_j + W_j.v)   (Gaussian visible units of unit variance)

Contrastive divergence (CD-k) moves the weights by <v h>_data - <v h>_model, where the model
side is k steps of block Gibbs sampling started at the data (persistent CD: at the chains of the
previous step). Since dF/dW_ji = -v_i p(h_j = 1 | v), that update is minus the gradient of

    loss = mean F(v_data) - mean F(v_k)   (v_k held constant)

so the RBM trains through the same optimizer, allreduce and parameter averaging as every other
model: SGD with lr, momentum and weight decay (train.optimizer: sgd) is the textbook CD update
with momentum and weight decay. The hidden units of the Gibbs chain are sampled; the visible ones
too, except at the last step, whose probabilities (or means) are used (Hinton's practical guide).
A deep belief net stacks them (dl.models.dbn)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dl.models.base import ModelSpec, check_positive


def hidden_p(linear: nn.Linear, v: torch.Tensor) -> torch.Tensor:
    """p(h = 1 | v)."""
    return torch.sigmoid(linear(v))


def visible_mean(linear: nn.Linear, bias: torch.Tensor, h: torch.Tensor, gaussian: bool) -> torch.Tensor:
    """E[v | h]: p(v = 1 | h) for Bernoulli units, the mean for Gaussian ones."""
    a = F.linear(h, linear.weight.t(), bias)
    return a if gaussian else torch.sigmoid(a)


def free_energy(linear: nn.Linear, bias: torch.Tensor, v: torch.Tensor, gaussian: bool) -> torch.Tensor:
    """F(v) per row."""
    visible = 0.5 * (v - bias).pow(2).sum(1) if gaussian else -(v @ bias)
    return visible - F.softplus(linear(v)).sum(1)


def gibbs(linear: nn.Linear, bias: torch.Tensor, v: torch.Tensor, k: int, gaussian: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """k steps of block Gibbs sampling from v: (the last visible mean, a visible sample drawn from it)."""
    with torch.no_grad():
        for _ in range(k):
            mean = visible_mean(linear, bias, torch.bernoulli(hidden_p(linear, v)), gaussian)
            v = mean + torch.randn_like(mean) if gaussian else torch.bernoulli(mean)
    return mean, v


def cd_loss(linear: nn.Linear, bias: torch.Tensor, v0: torch.Tensor, vk: torch.Tensor, gaussian: bool) -> torch.Tensor:
    """mean F(v0) - mean F(vk): its gradient is minus the CD update."""
    return free_energy(linear, bias, v0, gaussian).mean() - free_energy(linear, bias, vk.detach(), gaussian).mean()


def negative_phase(model: nn.Module, linear: nn.Linear, bias: torch.Tensor, v0: torch.Tensor, gaussian: bool) -> torch.Tensor:
    """The chain's last visible mean for CD-k from the data, or (training with cfg.persistent) from
    where model.chains ended; keeps the new chains in model.chains."""
    persistent = model.training and model.cfg.persistent
    start = model.chains if persistent and model.chains is not None and model.chains.shape == v0.shape else v0
    mean, sample = gibbs(linear, bias, start, model.cfg.k, gaussian)
    if persistent:
        model.chains = sample
    return mean


def _init(linear: nn.Linear) -> nn.Linear:
    nn.init.normal_(linear.weight, 0.0, 0.01)  # small random weights, zero biases (Hinton's practical guide)
    nn.init.zeros_(linear.bias)
    return linear


@dataclass(frozen=True, kw_only=True)
class RBMConfig:
    hidden: int = 256
    visible: Literal["bernoulli", "gaussian"] = "bernoulli"  # gaussian: real values of unit variance (standardized tables)
    k: int = 1  # Gibbs steps of CD-k
    persistent: bool = False  # persistent CD: the negative chains continue from the previous step's

    def __post_init__(self):
        check_positive("hidden", self.hidden)
        check_positive("k", self.k)


class RBM(nn.Module):
    """`features` is p(h | v) (what `dlpipe embed` writes); `forward` is the mean-field
    reconstruction E[v | p(h | v)], shaped like x; the model owns its objective."""

    def __init__(self, cfg: RBMConfig, input_shape: tuple[int, ...], num_outputs: int = 0):
        super().__init__()
        self.cfg, self.input_shape = cfg, tuple(input_shape)
        visible = int(np.prod(input_shape))
        self.features = nn.Sequential(nn.Flatten(), _init(nn.Linear(visible, cfg.hidden)), nn.Sigmoid())
        self.visible_bias = nn.Parameter(torch.zeros(visible))
        self.gaussian = cfg.visible == "gaussian"
        self.embedding_size = cfg.hidden
        self.chains: torch.Tensor | None = None  # persistent CD: per worker, not saved (restart from the data)

    @property
    def linear(self) -> nn.Linear:
        return self.features[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return visible_mean(self.linear, self.visible_bias, self.features(x), self.gaussian).view(x.shape)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean F(data) - mean F(chain), sum of the per-example reconstruction MSE)."""
        v0 = x.flatten(1)
        mean = negative_phase(self, self.linear, self.visible_bias, v0, self.gaussian)
        errors = (self(x).flatten(1) - v0).pow(2).mean(1)
        return cd_loss(self.linear, self.visible_bias, v0, mean, self.gaussian), errors.detach().sum()

    @torch.no_grad()
    def epoch_metrics(self, x: torch.Tensor) -> dict[str, float]:
        """Sums over the rows (the trainer divides by the rows of every worker)."""
        return {"free_energy": free_energy(self.linear, self.visible_bias, x.flatten(1), self.gaussian).sum().item()}

    @torch.no_grad()
    def sample(self, n: int, steps: int, seed: int = 0) -> torch.Tensor:
        """n visible means after `steps` Gibbs steps from uniform noise, shaped like the input."""
        torch.manual_seed(seed)
        start = torch.rand(n, self.linear.in_features)
        return gibbs(self.linear, self.visible_bias, start, steps, self.gaussian)[0].view(n, *self.input_shape)

    def filters(self) -> torch.Tensor:
        """The weights of each hidden unit, shaped like the input: hidden x input shape."""
        return self.linear.weight.detach().view(-1, *self.input_shape)


SPEC = ModelSpec(name="rbm", config=RBMConfig, build=RBM, tasks=("reconstruction",), inputs=("image", "table"))
