"""Recurrent nets of the course notes: a plain RNN (tanh), an LSTM or a GRU, `layers` deep,
optionally bidirectional, with dropout between layers, over one of two inputs:

- token ids (`vocab_size` > 0, set by train from <data.name>_vocab): right-padded with 0 (<pad>),
  embedded; a sequence's length is its count of non-zero ids. Batches are packed
  (`pack_padded_sequence`), so no step is computed on padding and padding never changes a
  sequence's output. Tasks: classification (the last states of both directions -> class logits) and
  language_model (every step predicts the next token; unidirectional only);
- a window of values (`vocab_size` 0, time series): each window is standardized by its own mean
  and std (the forecast is scaled back), every step takes one value, the last state -> the next
  `horizon` values. Task: regression (`num_outputs` = horizon).

The LSTM's forget-gate biases start at `forget_bias` (Gers et al. 2000: 1 keeps the cell state
open at the start). The model owns its objective (`objective`), so the trainer needs nothing
recurrent; `step` is the one-step recurrence that sampling uses (`generate`). The served model
is this module compiled with TorchScript (`forward` and `step`), no Python code of dlpipe."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dl.models.base import ModelSpec, ParamError, check_fraction, check_positive


@dataclass(frozen=True, kw_only=True)
class RNNConfig:
    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    layers: int = 1
    hidden: int = 128
    bidirectional: bool = False
    dropout: float = 0.0  # between stacked layers (needs layers >= 2)
    forget_bias: float = 1.0  # LSTM: initial bias of the forget gates
    embedding: int = 64  # token embedding size (token input only)
    vocab_size: int = 0  # set by train from the vocabulary table; 0 = a window of values

    def __post_init__(self):
        check_positive("layers", self.layers)
        check_positive("hidden", self.hidden)
        check_positive("embedding", self.embedding)
        check_fraction("dropout", self.dropout)
        if self.vocab_size < 0:
            raise ParamError("vocab_size", f"expected 0 (values) or the vocabulary size, got {self.vocab_size}")


class Recurrence(nn.Module):
    """nn.RNN | nn.GRU over padded batches with lengths; the state is (h, c) for all cells, c
    unused but by the LSTM (TorchScript compiles one class per cell, so each has its own)."""

    def __init__(self, cfg: RNNConfig, inputs: int):
        super().__init__()
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
        self.net = kind(inputs, cfg.hidden, num_layers=cfg.layers, batch_first=True, bidirectional=cfg.bidirectional,
                        dropout=cfg.dropout if cfg.layers > 1 else 0.0)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                state: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """(outputs batch x time x directions*hidden, zero after each length; h; c). With lengths
        the batch is packed: no step is computed on padding."""
        h0 = None if state is None else state[0]
        if lengths is None:
            out, h = self.net(x, h0)
            return out, h, h
        packed, h = self.net(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False), h0)
        return pad_packed_sequence(packed, batch_first=True, total_length=x.shape[1])[0], h, h


class LSTMRecurrence(Recurrence):
    def __init__(self, cfg: RNNConfig, inputs: int):
        super().__init__(cfg, inputs)
        with torch.no_grad():  # gates are ordered input, forget, cell, output; the two biases add up
            for name, p in self.net.named_parameters():
                if name.startswith("bias_"):
                    p[cfg.hidden: 2 * cfg.hidden].fill_(cfg.forget_bias if name.startswith("bias_ih") else 0.0)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                state: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        if lengths is None:
            out, (h, c) = self.net(x, state)
            return out, h, c
        packed, (h, c) = self.net(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False), state)
        return pad_packed_sequence(packed, batch_first=True, total_length=x.shape[1])[0], h, c


class RNN(nn.Module):
    def __init__(self, cfg: RNNConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        self.tokens = cfg.vocab_size > 0
        self.per_step = self.tokens and num_outputs == cfg.vocab_size  # a language model: logits at every step
        if self.per_step and cfg.bidirectional:
            raise ParamError("bidirectional", "a language model reads left to right: expected false")
        self.embed = nn.Embedding(max(cfg.vocab_size, 1), cfg.embedding, padding_idx=0)
        self.recurrence = (LSTMRecurrence if cfg.cell == "lstm" else Recurrence)(cfg, cfg.embedding if self.tokens else 1)
        self.directions = 2 if cfg.bidirectional else 1
        self.features = nn.Identity()  # the embedding of a sequence is its last states (no extra layer)
        self.head = nn.Linear(self.directions * cfg.hidden, num_outputs)
        self.length = int(input_shape[0])
        self.embedding_size = self.directions * cfg.hidden

    def lengths(self, x: torch.Tensor) -> torch.Tensor:
        """Token count of each right-padded row (at least 1: an empty row is refused by the pyfunc)."""
        return (x != 0).sum(1).clamp(min=1)

    def encode(self, x: torch.Tensor):
        """(per-step outputs, last states batch x directions*hidden)."""
        if self.tokens:
            ids = x.long()
            out, h, _ = self.recurrence(self.embed(ids), self.lengths(ids))
        else:
            out, h, _ = self.recurrence(x.unsqueeze(-1))
        last = torch.cat([h[-2], h[-1]], 1) if self.directions == 2 else h[-1]
        return out, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits | next-token logits at every step (batch x time x vocab) | the forecast."""
        if self.tokens:
            out, last = self.encode(x)
            return self.head(out) if self.per_step else self.head(last)
        mean, std = self.scale(x)
        _, last = self.encode((x - mean) / std)
        return self.head(last) * std + mean

    def scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of each window (std 1 for a window of one value)."""
        if x.shape[1] < 2:
            return x.mean(1, keepdim=True), torch.ones_like(x[:, :1])
        return x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp(min=1e-3)

    @torch.jit.export
    def step(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor, first: bool):
        """Language model: feed `ids` (batch x time) from state (h, c) (ignored when `first`);
        returns (logits of the token after the last one, h, c)."""
        state = None if first else (h, c)
        out, h, c = self.recurrence(self.embed(ids.long()), None, state)
        return self.head(out[:, -1]), h, c

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, sum over the batch of the epoch figure): accuracy | bits per token | mean absolute error."""
        if self.per_step:  # predict ids[t + 1] from ids[..t]; padding is no target
            ids = x.long()
            logits = self(ids)[:, :-1]
            target = ids[:, 1:]
            mask = (target != 0).float()
            nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="none").view_as(mask) * mask
            per_row = nats.sum(1) / mask.sum(1).clamp(min=1) / math.log(2)
            return nats.sum() / mask.sum().clamp(min=1), per_row.detach().sum()
        if self.tokens:
            logits = self(x).float()
            return F.cross_entropy(logits, y), (logits.detach().argmax(1) == y).sum()
        mean, std = self.scale(x)
        forecast = self(x).float()
        loss = F.mse_loss((forecast - mean) / std, (y.reshape(forecast.shape) - mean) / std)  # scale-free
        return loss, (forecast.detach() - y.reshape(forecast.shape)).abs().mean(1).sum()

    @torch.no_grad()
    def generate(self, prompt: list[int], length: int, temperature: float = 1.0, seed: int = 0) -> list[int]:
        """`length` token ids after `prompt`: sampled from softmax(logits / temperature), the most
        likely one at temperature 0 (deterministic)."""
        return sample(self, prompt, length, temperature, seed)


def sample(model, prompt: list[int], length: int, temperature: float, seed: int) -> list[int]:
    """The sampling loop over `model.step` (the served pyfunc runs the same loop on the scripted step)."""
    if not prompt:
        raise ValueError("prompt: expected at least one token")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long)
    h = c = torch.zeros(0)
    out: list[int] = []
    first = True
    for _ in range(length):
        logits, h, c = model.step(ids, h, c, first)
        first = False
        logits[0, 0] = float("-inf")  # never <pad>
        if temperature <= 0:
            nxt = int(logits[0].argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits[0].float() / temperature, 0), 1, generator=generator))
        out.append(nxt)
        ids = torch.tensor([[nxt]], dtype=torch.long)
    return out


SPEC = ModelSpec(name="rnn", config=RNNConfig, build=RNN, tasks=("classification", "regression", "language_model"),
                 inputs=("text", "series"))
