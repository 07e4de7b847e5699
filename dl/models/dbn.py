"""Deep belief net (Hinton, Osindero & Teh 2006): a stack of RBMs (dl.models.rbm) pretrained greedily,
then unrolled into a sigmoid MLP with a softmax head and fine-tuned with labels. With
`train.pretrain: greedy` the trainer calls `set_pretraining(k)` for k = 0 .. layers - 1: layer k
trains as an RBM (CD-k, the same free-energy loss) on the hidden probabilities of the frozen
layers below it, and logs its own free energy and reconstruction error (`layer<k+1>_*`); then
`set_pretraining(None)` releases every weight for fine-tuning. Without pretraining the same net
is the sigmoid MLP trained from scratch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dl.models.base import ModelSpec, ParamError, check_positive
from dl.models.rbm import _init, cd_loss, free_energy, hidden_p, negative_phase, visible_mean


@dataclass(frozen=True, kw_only=True)
class DBNConfig:
    layers: list[int] = field(default_factory=lambda: [500, 200])  # hidden units of each stacked RBM
    visible: Literal["bernoulli", "gaussian"] = "bernoulli"  # the input layer's units; the layers above are Bernoulli
    k: int = 1
    persistent: bool = False

    def __post_init__(self):
        check_positive("layers", self.layers)
        check_positive("k", self.k)
        if not self.layers:
            raise ParamError("layers", "expected at least one layer")


class DBN(nn.Module):
    """A stack of RBMs; `features` (the sigmoid stack) + `head` (softmax logits) is the fine-tuned MLP."""

    def __init__(self, cfg: DBNConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        self.cfg = cfg
        sizes = [int(np.prod(input_shape)), *cfg.layers]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes, sizes[1:]):
            layers += [_init(nn.Linear(a, b)), nn.Sigmoid()]
        self.features = nn.Sequential(*layers)
        self.linears = [m for m in layers if isinstance(m, nn.Linear)]  # not registered twice
        self.visible_biases = nn.ParameterList([nn.Parameter(torch.zeros(a)) for a in sizes[:-1]])
        self.head = nn.Linear(sizes[-1], num_outputs)
        self.embedding_size = sizes[-1]
        self.pretrain_layers = len(cfg.layers)
        self.pretraining: int | None = None
        self.chains: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def set_pretraining(self, layer: int | None) -> None:
        """Train layer `layer` as an RBM (every other weight frozen), or None: fine-tune everything."""
        if layer != self.pretraining:
            self.chains = None
        self.pretraining = layer
        if layer is None:
            self.requires_grad_(True)
            return
        trainable = {id(p) for p in [*self.linears[layer].parameters(), self.visible_biases[layer]]}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)

    def layer_input(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """What layer `layer` sees: the hidden probabilities of the (frozen) layers below."""
        h = x.flatten(1)
        with torch.no_grad():
            for linear in self.linears[:layer]:
                h = hidden_p(linear, h)
        return h

    def _rbm(self, layer: int) -> tuple[nn.Linear, torch.Tensor, bool]:
        return self.linears[layer], self.visible_biases[layer], layer == 0 and self.cfg.visible == "gaussian"

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine-tuning: (cross entropy, correct predictions). Pretraining layer k: (its CD loss, 0)."""
        if self.pretraining is None:
            logits = self(x)
            return F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).sum()
        linear, bias, gaussian = self._rbm(self.pretraining)
        v0 = self.layer_input(x, self.pretraining)
        mean = negative_phase(self, linear, bias, v0, gaussian)
        return cd_loss(linear, bias, v0, mean, gaussian), torch.zeros(())

    @torch.no_grad()
    def epoch_metrics(self, x: torch.Tensor) -> dict[str, float]:
        """While layer k is pretrained: its free energy and reconstruction error (sums over rows)."""
        if self.pretraining is None:
            return {}
        linear, bias, gaussian = self._rbm(self.pretraining)
        v = self.layer_input(x, self.pretraining)
        rebuilt = visible_mean(linear, bias, hidden_p(linear, v), gaussian)
        name = f"layer{self.pretraining + 1}"
        return {f"{name}_free_energy": free_energy(linear, bias, v, gaussian).sum().item(),
                f"{name}_reconstruction_mse": (rebuilt - v).pow(2).mean(1).sum().item()}


SPEC = ModelSpec(name="dbn", config=DBNConfig, build=DBN, tasks=("classification",), inputs=("image", "table"))
