"""Autoencoders of the course notes: an encoder squeezes the input to a code, a decoder that
mirrors it rebuilds the input, and the loss is the reconstruction error (mean squared error per
value) plus, by kind, what makes the code useful when it is not smaller than the input:

- deep: the plain stack (Hinton & Salakhutdinov 2006), a linear code;
- denoising: Gaussian noise of std `noise` on the input while training, the clean input as target;
- sparse: sigmoid code units whose mean activation over the batch is pulled to `sparsity` by
  `sparsity_weight` * sum_j KL(sparsity || mean activation of unit j);
- contractive: `contractive_weight` * the squared Frobenius norm of the encoder's Jacobian
  d code / d input, averaged over the batch (Rifai et al. 2011).

`tied`: each decoder layer uses the transpose of its mirror's encoder weight (own biases only).
Greedy layer-wise pretraining (`train.pretrain: greedy`, Hinton & Salakhutdinov 2006, Bengio et
al. 2007): the trainer calls `set_pretraining(k)` for k = 0 .. pretrain_layers - 1 and then
`set_pretraining(None)`; while layer k is pretrained, encoder layer k and its mirror decoder layer
form a shallow autoencoder of what the frozen layers below feed it (no penalty), and every other
weight is frozen; None releases them all for end-to-end training with the kind's loss.
Images (values in [0, 1]) are rebuilt through a sigmoid, table features linearly. `features` is the
encoder, so `dlpipe embed` writes codes; the model owns its objective (`objective`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import jacrev, vmap
from torch.nn import functional as F

from dl.models.base import ModelSpec, ParamError, activation, check_positive


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    kind: Literal["deep", "denoising", "sparse", "contractive"] = "deep"
    encoder: list[int] = field(default_factory=lambda: [512, 128])  # hidden sizes; the decoder mirrors them
    code: int = 30  # code size
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"  # hidden layers
    tied: bool = False  # decoder weights = transposed encoder weights
    noise: float = 0.3  # denoising: std of the Gaussian noise added to training inputs
    sparsity: float = 0.05  # sparse: target mean activation of each code unit
    sparsity_weight: float = 0.1  # sparse: weight of the KL term
    contractive_weight: float = 0.01  # contractive: weight of the squared Frobenius norm of the Jacobian

    def __post_init__(self):
        check_positive("encoder", self.encoder)
        check_positive("code", self.code)
        if not 0 < self.sparsity < 1:
            raise ParamError("sparsity", f"expected a number in (0, 1), got {self.sparsity}")
        for name in ("noise", "sparsity_weight", "contractive_weight"):
            if getattr(self, name) < 0:
                raise ParamError(name, f"expected a non-negative number, got {getattr(self, name)}")


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, input_shape: tuple[int, ...], num_outputs: int = 0):
        super().__init__()
        self.cfg, self.input_shape = cfg, tuple(input_shape)
        sizes = [int(np.prod(input_shape)), *cfg.encoder, cfg.code]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            last = i == len(sizes) - 2
            code_activation = nn.Sigmoid() if cfg.kind == "sparse" else nn.Identity()
            layers += [nn.Linear(a, b), code_activation if last else activation(cfg.activation)]
        self.features = nn.Sequential(*layers)  # input -> code
        self.encoder_linears = [m for m in layers if isinstance(m, nn.Linear)]  # not registered twice
        self.encoder_activations = [layers[i + 1] for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
        mirrored = list(reversed(sizes))
        if cfg.tied:
            self.decoder_bias = nn.ParameterList([nn.Parameter(torch.zeros(b)) for b in mirrored[1:]])
        else:
            self.decoder = nn.ModuleList([nn.Linear(a, b) for a, b in zip(mirrored, mirrored[1:])])
        self.output = nn.Sigmoid() if len(self.input_shape) == 3 else nn.Identity()  # images in [0, 1]
        self.hidden_activation = activation(cfg.activation)
        self.embedding_size = cfg.code
        self.pretrain_layers = len(self.encoder_linears)
        self.pretraining: int | None = None  # the encoder layer being pretrained, None = end to end

    def decode_step(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """Decoder layer j (0 = the one after the code), the mirror of encoder layer n - 1 - j."""
        n = len(self.encoder_linears)
        if self.cfg.tied:
            h = F.linear(h, self.encoder_linears[n - 1 - j].weight.t(), self.decoder_bias[j])
        else:
            h = self.decoder[j](h)
        return self.output(h) if j == n - 1 else self.hidden_activation(h)

    def set_pretraining(self, layer: int | None) -> None:
        """Pretrain encoder layer `layer` and its mirror alone (all else frozen), or None: all trainable."""
        self.pretraining = layer
        if layer is None:
            self.requires_grad_(True)
            return
        j = len(self.encoder_linears) - 1 - layer
        mirror = [self.decoder_bias[j]] if self.cfg.tied else list(self.decoder[j].parameters())
        trainable = {id(p) for p in [*self.encoder_linears[layer].parameters(), *mirror]}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """code -> flat reconstruction."""
        h = code
        for j in range(len(self.encoder_linears)):
            h = self.decode_step(j, h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x, shaped like x (no noise: this is the served model)."""
        return self.decode(self.features(x)).view(x.shape)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of the batch, sum of the per-example reconstruction MSE): the trainer's hook."""
        if self.pretraining is not None:
            return self.layer_objective(x, self.pretraining)
        noisy = self.training and self.cfg.kind == "denoising" and self.cfg.noise > 0
        inputs = x + self.cfg.noise * torch.randn_like(x) if noisy else x
        code = self.features(inputs)
        errors = (self.decode(code) - x.flatten(1)).pow(2).mean(1)
        loss = errors.mean()
        if self.cfg.kind == "sparse" and self.cfg.sparsity_weight:
            loss = loss + self.cfg.sparsity_weight * kl_sparsity(code, self.cfg.sparsity)
        if self.cfg.kind == "contractive" and self.cfg.contractive_weight:
            loss = loss + self.cfg.contractive_weight * self.jacobian_penalty(inputs)
        return loss, errors.detach().sum()

    def layer_objective(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder layer `layer` and its mirror rebuilding the layer's input (the frozen layers' output)."""
        h = x.flatten(1)
        with torch.no_grad():
            for linear, act in zip(self.encoder_linears[:layer], self.encoder_activations):
                h = act(linear(h))
        code = self.encoder_activations[layer](self.encoder_linears[layer](h))
        errors = (self.decode_step(len(self.encoder_linears) - 1 - layer, code) - h).pow(2).mean(1)
        return errors.mean(), errors.detach().sum()

    def jacobian_penalty(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ||d code / d input||_F^2."""
        jacobians = vmap(jacrev(lambda one: self.features(one[None])[0]))(x)  # batch x code x input dims
        return jacobians.pow(2).flatten(1).sum(1).mean()


def kl_sparsity(code: torch.Tensor, target: float) -> torch.Tensor:
    """sum_j KL(target || mean activation of code unit j over the batch), Bernoulli KL."""
    rho = code.mean(0).clamp(1e-6, 1 - 1e-6)
    return (target * torch.log(target / rho) + (1 - target) * torch.log((1 - target) / (1 - rho))).sum()


SPEC = ModelSpec(name="autoencoder", config=AutoencoderConfig, build=Autoencoder, tasks=("reconstruction",),
                 inputs=("image", "table"))
