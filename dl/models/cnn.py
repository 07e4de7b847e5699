"""Convolutional net as the course notes draw it: conv/ReLU/pool blocks, then fully connected
layers ending in class scores (softmax is applied by the loss and at serving time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class CNNConfig:
    in_channels: int
    image_size: int
    num_classes: int
    conv_channels: tuple[int, ...] = (32, 64)
    kernel_size: int = 3
    hidden: int = 128
    dropout: float = 0.25
    batch_norm: bool = True


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        blocks: list[nn.Module] = []
        channels, size = cfg.in_channels, cfg.image_size
        for out in cfg.conv_channels:
            blocks += [
                nn.Conv2d(channels, out, cfg.kernel_size, padding=cfg.kernel_size // 2),
                nn.BatchNorm2d(out) if cfg.batch_norm else nn.Identity(),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = out, size // 2
        if size < 1:
            raise ValueError(f"{len(cfg.conv_channels)} pooling blocks shrink a {cfg.image_size}px image to nothing")
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(channels * size * size, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, height, width) in [0, 1]; returns class logits."""
        return self.head(self.features(x))
