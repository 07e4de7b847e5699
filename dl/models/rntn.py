"""Recursive neural tensor network (Socher et al. 2013): a phrase's vector is composed from its two
children's up a binary parse tree, p = tanh([a; b]^T V [a; b] + W [a; b] + c), where each of the
`dim` slices of the tensor V lets one child change how the other is read ("not" flips what it
meets, "very" scales it), and a softmax classifies every node, word and phrase alike. With
`tensor: false` it is the plain recursive net (the W term only).

Input: trees as laid out by dl/bracketed.encode, one row per tree (data.kind: trees). A batch is
composed level by level (leaves, then every node of height 1 across the whole batch, then
height 2, ...), so one step costs one batched matrix product per level of the tallest tree, not
one Python call per node. The objective is the cross-entropy of every labelled node; the
epoch figure and the served output are the root's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dl.models.base import ModelSpec, ParamError, check_positive

WIDTH = 5  # dl.bracketed.FIELDS: word, left, right, label, height


@dataclass(frozen=True, kw_only=True)
class RNTNConfig:
    dim: int = 25  # the vector of every word and phrase
    tensor: bool = True  # false: the plain recursive neural net, W [a; b] only
    vocab_size: int = 0  # set by train from the vocabulary table (<data.name>_vocab)

    def __post_init__(self):
        check_positive("dim", self.dim)


class RNTN(nn.Module):
    def __init__(self, cfg: RNTNConfig, input_shape: tuple[int, ...] = (), num_outputs: int = 5):
        super().__init__()
        if cfg.vocab_size <= 2:
            raise ParamError("vocab_size", f"expected the vocabulary's size (set by train from <data.name>_vocab), got {cfg.vocab_size}")
        d = cfg.dim
        self.dim, self.fields = d, WIDTH
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=0.1)
        self.layer = nn.Linear(2 * d, d)
        # one (2d x 2d) slice per output unit; empty for the plain recursive net
        self.tensor = nn.Parameter(torch.randn(d, 2 * d, 2 * d) / (4 * d) if cfg.tensor else torch.zeros(0))
        self.head = nn.Linear(d, num_outputs)
        self.embedding_size = d

    def compose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors of every node slot B*N x dim, the node rows B*N x 5, the root's slot per tree)."""
        b = x.shape[0]
        rows = x.long().reshape(b, -1, self.fields)
        n = rows.shape[1]
        flat = rows.reshape(-1, self.fields)
        word, left, right, height = flat[:, 0], flat[:, 1], flat[:, 2], flat[:, 4]
        base = torch.arange(b, device=x.device).repeat_interleave(n) * n  # the first slot of each node's tree
        h = torch.zeros(b * n, self.dim, device=x.device, dtype=self.embed.weight.dtype)
        leaves = (height == 0).nonzero().squeeze(1)
        h = h.index_copy(0, leaves, self.embed(word[leaves]))
        top = int(height.max()) if flat.shape[0] > 0 else 0
        for level in range(1, top + 1):
            at = (height == level).nonzero().squeeze(1)
            c = torch.cat([h[base[at] + left[at]], h[base[at] + right[at]]], 1)
            z = self.layer(c)
            if self.tensor.numel() > 0:  # c^T V_k c for every slice k: one matrix product (F.bilinear is ~6x slower)
                d = self.dim
                cv = (c @ self.tensor.permute(1, 0, 2).reshape(2 * d, d * 2 * d)).view(-1, d, 2 * d)
                z = z + (cv * c[:, None, :]).sum(-1)
            h = h.index_copy(0, at, torch.tanh(z))
        roots = torch.arange(b, device=x.device) * n + (rows[:, :, 4] >= 0).sum(1) - 1
        return h, flat, roots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of each tree's root."""
        h, _, roots = self.compose(x)
        return self.head(h[roots])

    def objective(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """(mean cross-entropy over every labelled node of the batch, roots classified right)."""
        h, flat, roots = self.compose(x)
        labelled = flat[:, 3] >= 0
        loss = F.cross_entropy(self.head(h[labelled]).float(), flat[labelled, 3])
        right = (self.head(h[roots]).argmax(1) == flat[roots, 3]).sum()
        return loss, float(right)

    def epoch_metrics(self, x: torch.Tensor) -> dict[str, float]:
        """node_accuracy: per tree, the share of its labelled nodes classified right (summed over trees)."""
        h, flat, _ = self.compose(x)
        labels = flat[:, 3].view(len(x), -1)
        right = (self.head(h).argmax(1).view(len(x), -1) == labels) & (labels >= 0)
        return {"node_accuracy": float((right.sum(1) / (labels >= 0).sum(1).clamp(min=1)).sum())}


SPEC = ModelSpec(name="rntn", config=RNTNConfig, build=RNTN, tasks=("classification",), inputs=("trees",))
