"""word2vec (Mikolov et al. 2013): word vectors learned by telling a word's true neighbours from noise
words (negative sampling). `skipgram`: every (word, neighbour) pair in the window is one example;
`cbow`: the mean of the neighbours' vectors predicts the word. As in the reference C code (and
gensim), frequent words are dropped at random before the windows are cut (keep probability
(sqrt(f / t) + 1) t / f for a word of corpus frequency f, t = `subsample`), every word's window is
drawn uniformly from 1..`window` (`dynamic_window`), and the noise words come from the unigram
counts raised to 3/4. min count is the vocabulary's (data.text.min_count).

One example is a row of a text table: its token ids, padded with 0 (<pad>); 1 (<unk>, a word
below min count) is dropped like padding. Two ways to train (`update`):
- `pairs` (the default): word2vec's own SGD, one step per (word, neighbour) pair (CBOW: per word
  and its window), in a compiled loop (dl/models/word2vec_sgd.py) that takes the epoch itself
  (`train_epoch`). The rate falls
  linearly from train.lr (word2vec's 0.025) over all epochs. With N workers, each trains on its
  shard and every `sync_rows` rows the workers' changes since the last sync are added up (what
  word2vec's threads do in one shared table); averaging them instead would take 1/N of each step.
- `batches`: the mean negative-sampling loss over the pairs of a batch (`objective`), trained by
  train.optimizer with the same allreduce or parameter-averaging trainer as every other model.
The validation figures come from `objective` either way (under `pairs`, the compiled loop at
rate 0). Served, the net maps token ids to their input
vectors (`forward`); the output vectors only serve training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dl.models.base import ModelSpec, ParamError, check_positive

FIRST_WORD = 2  # ids 0 and 1 are <pad> and <unk>
NOISE_TABLE = 1_000_000


@dataclass(frozen=True, kw_only=True)
class Word2VecConfig:
    architecture: Literal["skipgram", "cbow"] = "skipgram"
    dim: int = 100
    window: int = 5  # the most words either side of the centre word
    dynamic_window: bool = True  # each word's window drawn from 1..window, as word2vec and gensim do
    negatives: int = 5  # noise words per example
    subsample: float = 1e-3  # t of the frequent-word subsampling; 0 = keep every word
    vocab_size: int = 0  # set by train from the vocabulary table (<data.name>_vocab)
    # pairs: word2vec's per-pair SGD, compiled; batches: the batched objective and train.optimizer
    update: Literal["pairs", "batches"] = "pairs"
    # batches only. mean: the gradient of the batch's mean loss (for adam, train.optimizer's default); sum: each example
    # moves its vectors by the full train.lr, as word2vec's own SGD does (optimizer sgd, small batches)
    gradient: Literal["mean", "sum"] = "mean"
    counts: tuple[int, ...] = ()  # corpus counts by token id (set with vocab_size): subsampling and the noise

    @property
    def trains_itself(self) -> bool:
        """update: pairs: the model takes its epochs itself (dl.train calls its train_epoch)."""
        return self.update == "pairs"

    def __post_init__(self):
        check_positive("dim", self.dim)
        check_positive("window", self.window)
        check_positive("negatives", self.negatives)
        if self.subsample < 0:
            raise ParamError("subsample", f"expected 0 (off) or a positive threshold such as 1e-3, got {self.subsample}")
        if self.counts and len(self.counts) != self.vocab_size:
            raise ParamError("counts", f"expected one count per token id ({self.vocab_size}), got {len(self.counts)}")


def keep_probability(counts: torch.Tensor, t: float) -> torch.Tensor:
    """word2vec's subsampling: a word of frequency f is kept with probability (sqrt(f / t) + 1) * t / f,
    at most 1; every word is kept when t is 0."""
    f = counts / counts.sum().clamp(min=1)
    if t <= 0:
        return torch.ones_like(f)
    return ((f / t).sqrt() + 1).mul(t / f.clamp(min=1e-12)).clamp(max=1.0)


def noise_distribution(counts: torch.Tensor) -> torch.Tensor:
    """Unigram counts ** 0.75, normalized; <pad> and <unk> are never noise."""
    p = counts.double().pow(0.75)
    p[:FIRST_WORD] = 0
    return (p / p.sum().clamp(min=1e-12)).float()


class Word2Vec(nn.Module):
    def __init__(self, cfg: Word2VecConfig, input_shape: tuple[int, ...] = (), num_outputs: int = 0):
        super().__init__()
        if cfg.vocab_size <= FIRST_WORD:
            raise ParamError("vocab_size", f"expected the vocabulary's size (set by train from <data.name>_vocab), got {cfg.vocab_size}")
        self.cfg = cfg
        counts = torch.tensor(cfg.counts or [1] * cfg.vocab_size, dtype=torch.float64)
        counts[:FIRST_WORD] = 0
        self.register_buffer("keep", keep_probability(counts, cfg.subsample).float(), persistent=False)
        # word2vec's table: each word's share of NOISE_TABLE slots is its noise probability, so a noise
        # word is one uniform draw (torch.multinomial over the vocabulary costs several times more)
        slots = (noise_distribution(counts).double().cumsum(0) * NOISE_TABLE).round().long()
        self.register_buffer("noise_table", torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32),
                                                                    slots.diff(prepend=slots.new_zeros(1))), persistent=False)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)  # the word vectors
        self.context = nn.Embedding(cfg.vocab_size, cfg.dim)  # output vectors, for training only
        nn.init.uniform_(self.embed.weight, -0.5 / cfg.dim, 0.5 / cfg.dim)  # as word2vec: input small, output 0
        nn.init.zeros_(self.context.weight)
        self.embedding_size = cfg.dim
        self.trains_itself = cfg.trains_itself
        self.rate = 0.0  # pairs: the rate at the last epoch's end (logged as lr)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The vectors of token ids (any shape) -> (*shape, dim)."""
        return self.embed(ids.long())

    def windows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centre ids B x T, neighbour ids B x T x 2W, mask of real neighbours B x T x 2W) of a batch of
        padded rows, after dropping <unk> and (training) subsampled words and closing the gaps: the
        centre rows hold the kept words first, then padding (0)."""
        ids = x.long()
        kept = ids >= FIRST_WORD
        if self.training and self.cfg.subsample > 0:
            kept &= torch.rand(ids.shape, device=ids.device) < self.keep[ids]
        order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices  # the kept words first, in order
        steps, w = ids.shape[1], self.cfg.window
        position = torch.arange(steps, device=ids.device)
        length = kept.sum(1, keepdim=True)
        ids = ids.gather(1, order) * (position < length)  # the dropped words become padding at the end
        offsets = torch.tensor([o for o in range(-w, w + 1) if o != 0], device=ids.device)
        where = position[None, :, None] + offsets  # 1 x T x 2W
        reach = (torch.randint(1, w + 1, ids.shape, device=ids.device) if self.training and self.cfg.dynamic_window
                 else torch.full(ids.shape, w, device=ids.device))
        mask = ((position[None, :] < length)[..., None] & (where >= 0) & (where < length[..., None])
                & (offsets.abs() <= reach[..., None]))
        neighbours = ids.gather(1, where.clamp(0, steps - 1).reshape(1, -1).expand(len(ids), -1)).reshape(mask.shape)
        return ids, neighbours, mask

    def noise_words(self, n: int) -> torch.Tensor:
        table = self.noise_table
        return table[torch.randint(len(table), (n,), device=table.device)]

    def objective(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """(mean loss over the examples, sum of the pair accuracy, examples): an example is a (word,
        neighbour) pair for skip-gram, a word with its window for CBOW; its loss is
        -log s(u_true . h) - sum over the noise words of log s(-u_noise . h), and its pair accuracy the
        share of its 1 + negatives yes/no decisions (true neighbour or noise) the model gets right."""
        if self.trains_itself and not self.training:
            return self._score(x)
        centre, neighbours, mask = self.windows(x)
        k = self.cfg.negatives
        pairs = mask.sum(-1)
        has = pairs > 0  # the words with at least one neighbour: one example each (CBOW) or one per pair
        if not bool(has.any()):
            return self.embed.weight.sum() * 0, 0.0, 0
        inside, pairs = mask[has], pairs[has].float()
        if self.cfg.architecture == "skipgram":
            h = self.embed(centre[has])  # C x dim
            true_score = (self.context(neighbours[has]) * h[:, None, :]).sum(-1)  # C x 2W
            true_loss = (-F.logsigmoid(true_score) * inside).sum(-1)
            true_right = ((true_score > 0) & inside).sum(-1).float()
            per_word = pairs  # the noise term counts once per pair of the word
        else:
            h = (self.embed(neighbours[has]) * inside[..., None]).sum(1) / pairs[:, None]
            true_score = (h * self.context(centre[has])).sum(-1)
            true_loss, true_right, per_word = -F.logsigmoid(true_score), (true_score > 0).float(), torch.ones_like(pairs)
        # the noise words are drawn per word and shared by its pairs (skip-gram): the same expectation as
        # fresh ones per pair, at a fraction of the work
        noise_score = (self.context(self.noise_words(len(h) * k).view(len(h), k)) * h[:, None, :]).sum(-1)  # C x k
        loss = true_loss - F.logsigmoid(-noise_score).sum(-1) * per_word
        right = (true_right + (noise_score < 0).float().sum(-1) * per_word) / (1 + k)
        examples = int(per_word.sum())
        total = loss.sum()
        mean = total / examples
        if self.cfg.gradient == "sum":  # the value reported stays the mean; the step is every example's own
            mean = mean + (total - mean) - (total - mean).detach()
        return mean, float(right.sum()), examples

    def _loop(self, rows: np.ndarray, keep: np.ndarray, dynamic_window: bool, lr: float, done: int, total: int,
              seed: int):
        """The compiled loop (dl/models/word2vec_sgd.train_rows) over `rows`, in place on both tables."""
        from dl.models.word2vec_sgd import train_rows  # numba: only where training or scoring runs

        return train_rows(rows, self.embed.weight.detach().numpy(), self.context.weight.detach().numpy(), keep,
                          self.noise_table.numpy(), self.cfg.architecture == "skipgram", self.cfg.window, dynamic_window,
                          self.cfg.negatives, lr, done, total, seed)

    @torch.no_grad()
    def _score(self, x: torch.Tensor):
        """`update: pairs`, evaluating: the same figures from the compiled loop with the rate at 0,
        every word kept and full windows (a noise word per pair, as in training)."""
        rows = x.cpu().numpy().astype(np.int32, copy=False)
        loss, right, examples, _, _ = self._loop(rows, np.ones(len(self.keep), np.float32), False, 0.0, 0, 1, 0)
        return torch.tensor(loss / max(examples, 1)), right, int(examples)

    @torch.no_grad()
    def train_epoch(self, x: torch.Tensor, epoch: int, epochs: int, dist, *, lr: float, sync_rows: int, seed: int,
                    shuffle: bool = True) -> tuple[float, float, int]:
        """`update: pairs`: one epoch of word2vec's SGD over this worker's rows, the workers' changes
        added up every `sync_rows` rows (and at the end, so every worker ends with the same tables).
        Returns this worker's (loss sum, pair-accuracy sum, examples)."""
        if self.embed.weight.device.type != "cpu":
            raise ValueError("model.word2vec.update: pairs trains on the CPU; use update: batches on a GPU")
        rows = x.numpy().astype(np.int32, copy=False)
        if shuffle:
            rows = rows[np.random.default_rng(seed).permutation(len(rows))]
        words = int((rows >= FIRST_WORD).sum())
        # every worker syncs as often as the one with the most rows: the same number of collectives
        chunks = -dist.min(-max(1, -(-len(rows) // sync_rows))) if dist.size > 1 else 1
        done = (epoch - 1) * words
        loss = right = examples = 0.0
        tables = self.embed.weight.detach().numpy(), self.context.weight.detach().numpy()
        sync = _Changes(*tables, dist) if dist.size > 1 else None
        for i, part in enumerate(np.array_split(rows, chunks)):
            out = self._loop(part, self.keep.numpy(), self.cfg.dynamic_window, lr, done, max(words * epochs, 1), seed + i)
            loss, right, examples, done = loss + out[0], right + out[1], examples + out[2], done + out[3]
            self.rate = out[4]
            if sync is not None:
                sync.add_up()
        return loss, right, int(examples)

    def vectors(self) -> torch.Tensor:
        """Every token's vector by id (rows 0 and 1: <pad>, <unk>, never trained)."""
        return self.embed.weight.detach()


class _Changes:
    """Both tables' values at the last sync, as one flat buffer; `add_up` makes both tables that
    plus the sum of every worker's change since, in one collective (buffers reused: the tables
    are 11 MB at 14 k words x 100, synced every few thousand rows)."""

    def __init__(self, vectors: np.ndarray, outputs: np.ndarray, dist):
        self.tables, self.dist = (vectors.reshape(-1), outputs.reshape(-1)), dist
        self.start = np.concatenate(self.tables)
        self.now = np.empty_like(self.start)

    def add_up(self) -> None:
        now, split = self.now, len(self.tables[0])
        np.concatenate(self.tables, out=now)
        now -= self.start
        self.dist.average_(torch.from_numpy(now))
        now *= self.dist.size
        now += self.start
        self.tables[0][:] = now[:split]
        self.tables[1][:] = now[split:]
        self.start, self.now = now, self.start


SPEC = ModelSpec(name="word2vec", config=Word2VecConfig, build=Word2Vec, tasks=("embedding",), inputs=("text",))
