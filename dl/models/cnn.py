"""Convolutional net as the course notes draw it: blocks of convolution, (batch norm), activation
and pooling, then fully connected layers, then a classifier or regression layer. Any channel
count and image size; the sizes after each block are computed, and a block that would shrink the
image to nothing is an error naming it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dl.models.base import ModelSpec, ParamError, activation, check_fraction, check_positive


@dataclass(frozen=True, kw_only=True)
class ConvBlock:
    channels: int
    kernel_size: int = 3
    stride: int = 1
    padding: Literal["same", "valid"] = "same"  # same: output size = ceil(input / stride)
    pool: Literal["max", "avg", "none"] = "max"
    pool_size: int = 2
    batch_norm: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        check_positive("channels", self.channels)
        check_positive("kernel_size", self.kernel_size)
        check_positive("stride", self.stride)
        check_positive("pool_size", self.pool_size)
        check_fraction("dropout", self.dropout)


@dataclass(frozen=True, kw_only=True)
class CNNConfig:
    blocks: list[ConvBlock] = field(default_factory=lambda: [ConvBlock(channels=32), ConvBlock(channels=64)])
    hidden: list[int] = field(default_factory=lambda: [128])  # fully connected layers before the head
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    dropout: float = 0.25  # before each fully connected layer

    def __post_init__(self):
        if not self.blocks:
            raise ParamError("blocks", "expected at least one convolution block")
        check_positive("hidden", self.hidden)
        check_fraction("dropout", self.dropout)


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        self.cfg = cfg
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        for i, b in enumerate(cfg.blocks):
            if b.padding == "same" and b.stride > 1:  # torch's "same" needs stride 1: pad by hand
                pad = b.kernel_size // 2
                conv = nn.Conv2d(channels, b.channels, b.kernel_size, stride=b.stride, padding=pad)
            else:
                conv = nn.Conv2d(channels, b.channels, b.kernel_size, stride=b.stride, padding=b.padding)
            layers += [conv, nn.BatchNorm2d(b.channels) if b.batch_norm else nn.Identity(), activation(cfg.activation)]
            height, width = (_out_size(s, b.kernel_size, b.stride, b.padding) for s in (height, width))
            if b.pool != "none":
                layers.append((nn.MaxPool2d if b.pool == "max" else nn.AvgPool2d)(b.pool_size))
                height, width = height // b.pool_size, width // b.pool_size
            if b.dropout:
                layers.append(nn.Dropout2d(b.dropout))
            if height < 1 or width < 1:
                raise ValueError(f"model.cnn.blocks[{i}] shrinks a {input_shape[1]}x{input_shape[2]} image to nothing")
            channels = b.channels
        layers.append(nn.Flatten())
        size = channels * height * width
        for h in cfg.hidden:
            layers += [nn.Dropout(cfg.dropout), nn.Linear(size, h), activation(cfg.activation)]
            size = h
        self.features = nn.Sequential(*layers)
        self.embedding_size = size
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(size, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, height, width) in [0, 1]; returns class logits (or one value)."""
        return self.head(self.features(x))


SPEC = ModelSpec(name="cnn", config=CNNConfig, build=CNN, tasks=("classification", "regression"), inputs=("image",))
