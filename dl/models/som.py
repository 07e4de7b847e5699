"""Self-organizing map (Kohonen), trained as a batch SOM: each epoch every row finds its best
matching unit (BMU, the nearest prototype); the sufficient statistics are, per unit, the sum of
the rows it won and their count; with the Gaussian neighbourhood h(u, v) = exp(-d(u, v)^2 / 2
sigma^2) over map positions, every prototype moves to the neighbourhood-weighted mean of the rows:

    w_u <- w_u + rate * (sum_v h(u, v) S_v / sum_v h(u, v) c_v - w_u)

rate 1 is the classic batch SOM. The radius sigma and the rate decay linearly from their start
to their end value over the epochs. The statistics are sums, so N workers summing theirs (one
allreduce per epoch) get exactly the epoch of one worker on all rows: the model takes its epoch
itself (`train_epoch`) instead of the gradient loop. Quality: quantization error (QE, the mean
distance of a row to its BMU) and topographic error (TE, the share of rows whose two nearest units
are not neighbours on the map), defined as MiniSom defines them. `forward` returns the squared
distances to every unit (the served model takes the argmin)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from dl.models.base import ModelSpec, ParamError, check_positive


@dataclass(frozen=True, kw_only=True)
class SOMConfig:
    rows: int = 10
    columns: int = 10
    topology: Literal["rectangular", "hexagonal"] = "rectangular"  # hexagonal: odd rows shifted by half a unit
    sigma: float = 0.0  # neighbourhood radius at the first epoch, in units; 0 = max(rows, columns) / 2
    sigma_end: float = 0.5  # ... at the last epoch
    rate: float = 1.0  # share of the way to the batch update each epoch, at the first epoch
    rate_end: float = 0.5  # ... at the last epoch

    def __post_init__(self):
        check_positive("rows", self.rows)
        check_positive("columns", self.columns)
        for name in ("sigma_end", "rate", "rate_end"):
            if getattr(self, name) <= 0:
                raise ParamError(name, f"expected a positive number, got {getattr(self, name)}")
        if self.sigma < 0:
            raise ParamError("sigma", f"expected a positive number or 0 (automatic), got {self.sigma}")
        if self.rate > 1 or self.rate_end > 1:
            raise ParamError("rate", f"expected rates in (0, 1], got {self.rate} -> {self.rate_end}")


class SOM(nn.Module):
    def __init__(self, cfg: SOMConfig, input_shape: tuple[int, ...], num_outputs: int = 0):
        super().__init__()
        self.cfg = cfg
        units, dim = cfg.rows * cfg.columns, int(np.prod(input_shape))
        self.register_buffer("weights", torch.rand(units, dim))  # prototypes; random in [0, 1)
        r, c = np.divmod(np.arange(units), cfg.columns)
        if cfg.topology == "hexagonal":
            positions = np.stack([c + 0.5 * (r % 2), r * math.sqrt(3) / 2], 1)
        else:
            positions = np.stack([c, r], 1).astype(float)
        self.register_buffer("positions", torch.tensor(positions, dtype=torch.float32), persistent=False)
        # map distance up to which two units are neighbours (TE): 8 around a square, 6 around a hexagon
        self.adjacent = 1.42 if cfg.topology == "rectangular" else 1.01
        self.rate = cfg.rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distance of every row to every unit: rows x units (|x|^2 - 2 x.w + |w|^2: one
        matrix product, and the same computation for any number of rows, so it exports)."""
        x = x.flatten(1)
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.weights.t() + self.weights.pow(2).sum(1)
        return d2.clamp(min=0)

    def schedule(self, epoch: int, epochs: int) -> tuple[float, float]:
        """(sigma, rate) of this epoch (1-based): linear from start to end."""
        t = (epoch - 1) / max(epochs - 1, 1)
        sigma0 = self.cfg.sigma or max(self.cfg.rows, self.cfg.columns) / 2
        return sigma0 + t * (self.cfg.sigma_end - sigma0), self.cfg.rate + t * (self.cfg.rate_end - self.cfg.rate)

    def neighbourhood(self, sigma: float) -> torch.Tensor:
        """units x units Gaussian of the map distance."""
        d2 = torch.cdist(self.positions, self.positions).pow(2)
        return torch.exp(-d2 / (2 * sigma * sigma))

    def quality(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(BMU of each row, its distance to it, 1 where the two nearest units are not neighbours)."""
        two = self(x).topk(2, dim=1, largest=False)
        bmu, second = two.indices[:, 0], two.indices[:, 1]
        apart = (self.positions[bmu] - self.positions[second]).norm(dim=1) > self.adjacent
        return bmu, two.values[:, 0].sqrt(), apart.float()

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean QE of the batch, sum of TE): the figures the trainer reports as loss and te."""
        _, qe, te = self.quality(x)
        return qe.mean(), te.sum()

    @torch.no_grad()
    def train_epoch(self, x: torch.Tensor, epoch: int, epochs: int, dist, batch_size: int = 1024, **_) -> tuple[float, float]:
        """One batch-SOM epoch on this worker's rows, combined with the other workers' by one
        dist.sum of the per-unit sums and counts; returns this worker's (QE sum, TE sum) of the
        rows against the prototypes the epoch started from."""
        units, dim = self.weights.shape
        sums = torch.zeros(units, dim, dtype=torch.float64, device=self.weights.device)
        counts = torch.zeros(units, dtype=torch.float64, device=self.weights.device)
        qe = te = 0.0
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].to(self.weights.device).flatten(1)
            bmu, dist_bmu, apart = self.quality(chunk)
            sums.index_add_(0, bmu, chunk.double())
            counts += torch.bincount(bmu, minlength=units).double()
            qe, te = qe + dist_bmu.sum().item(), te + apart.sum().item()
        total = torch.tensor(dist.sum([*sums.reshape(-1).tolist(), *counts.tolist()]), dtype=torch.float64)
        sums, counts = total[: units * dim].view(units, dim), total[units * dim :]
        sigma, self.rate = self.schedule(epoch, epochs)
        h = self.neighbourhood(sigma).double().cpu()
        target = (h @ sums) / (h @ counts).clamp(min=1e-12)[:, None]
        w = self.weights.double().cpu()
        self.weights.copy_((w + self.rate * (target - w)).to(self.weights))
        return qe, te

    def u_matrix(self) -> np.ndarray:
        """rows x columns: each unit's mean distance to its map neighbours' prototypes."""
        near = (torch.cdist(self.positions, self.positions) <= self.adjacent) & ~torch.eye(len(self.positions), dtype=torch.bool)
        d = torch.cdist(self.weights, self.weights)
        return ((d * near).sum(1) / near.sum(1)).view(self.cfg.rows, self.cfg.columns).cpu().numpy()


SPEC = ModelSpec(name="som", config=SOMConfig, build=SOM, tasks=("clustering",), inputs=("image", "table"))
