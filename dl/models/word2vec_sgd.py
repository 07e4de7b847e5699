"""word2vec's own training step, compiled: one SGD update per (word, neighbour) pair (skip-gram) or
per word and its window (CBOW), with negative sampling, as the reference C code and gensim take it.

Why our own loop: a batched autograd step over padded windows is bound by many small gathers and
scatters (docs/performance.md measured it at 3.45x gensim's time and below its analogy score), and
summing a batch of per-pair steps diverges. The loop below touches only the rows of the words in
each window. It is written with Numba (no C compiler needed on the executors) and works in place
on the numpy views of the model's two embedding tables. Nothing here imports torch.

The order of work follows gensim's `train_batch_sg` / `train_batch_cbow`: subsampling before the
windows are cut, a window of 1..window per centre word, the noise words from a unigram^0.75 table,
an update skipped where the score is beyond +-6 (the sigmoid table's range), and the rate falling
linearly from lr to lr * 1e-4 over all words of all epochs."""

from __future__ import annotations

import numba
import numpy as np

MAX_SCORE = 6.0
SIGMOID_SLOTS = 1000
_x = (np.arange(SIGMOID_SLOTS) / SIGMOID_SLOTS * 2 - 1) * MAX_SCORE
SIGMOID = (1 / (1 + np.exp(-_x))).astype(np.float32)
LOG_SIGMOID = np.log(SIGMOID).astype(np.float32)  # log s(x): a true neighbour's loss is minus this
LOG_1M_SIGMOID = np.log1p(-SIGMOID).astype(np.float32)  # log (1 - s(x)) = log s(-x): a noise word's
MIN_RATE = 1e-4  # the rate's floor as a share of lr (gensim: min_alpha 0.0001 of alpha 0.025)


@numba.njit(cache=True, fastmath=True, nogil=True)
def _next(state):
    return state * np.uint64(25214903917) + np.uint64(11)  # word2vec's generator


@numba.njit(cache=True, fastmath=True, nogil=True)
def draw_kept(state, keep_probability):
    """Subsampling: (whether the word stays, the next state), from 16 bits of the generator."""
    state = _next(state)
    return keep_probability >= 1.0 or keep_probability >= ((state >> np.uint64(16)) & np.uint64(0xFFFF)) / 65536.0, state


@numba.njit(cache=True, fastmath=True, nogil=True)
def draw_noise(state, noise):
    """A noise word from the table (ids, each word's share of the slots its probability) and the next state."""
    state = _next(state)
    return noise[np.int64((state >> np.uint64(16)) % np.uint64(noise.shape[0]))], state


@numba.njit(cache=True, fastmath=True, nogil=True)
def _pair(a, out, target, label, g_scale, neu):
    """One yes/no decision: the score of input vector `a` against output row `target`; updates
    `out[target]` and adds the input vector's step to `neu`. Returns (loss, right)."""
    b = out[target]
    f = np.float32(0.0)
    for d in range(a.shape[0]):
        f += a[d] * b[d]
    slot = min(max(np.int64((f + MAX_SCORE) * (SIGMOID_SLOTS / MAX_SCORE / 2)), 0), SIGMOID_SLOTS - 1)
    loss = -LOG_SIGMOID[slot] if label else -LOG_1M_SIGMOID[slot]
    right = (f > 0) == label
    if g_scale != 0 and -MAX_SCORE < f < MAX_SCORE:  # rate 0: scoring only
        g = ((np.float32(1.0) if label else np.float32(0.0)) - SIGMOID[slot]) * g_scale
        for d in range(a.shape[0]):
            neu[d] += g * b[d]
            b[d] += g * a[d]
    return loss, right


@numba.njit(cache=True, fastmath=True, nogil=True)
def _example(a, out, word, noise, negatives, rate, neu, state):
    """One example: input vector `a` against the true word and `negatives` noise words (a draw of
    the word itself is skipped). `neu` receives the input's step. Returns (loss, right, state)."""
    neu[:] = 0.0
    loss, right = _pair(a, out, word, True, rate, neu)
    for k in range(negatives):
        target, state = draw_noise(state, noise)
        if target != word:
            nl, nr = _pair(a, out, target, False, rate, neu)
            loss += nl
            right += nr
    return loss, right, state


@numba.njit(cache=True, fastmath=True, nogil=True)
def train_rows(rows, vectors, outputs, keep, noise, skipgram, window, dynamic_window, negatives, lr,
               words_done, words_total, seed):
    """Trains on `rows` (token ids, padded with 0; 1 = <unk>, dropped) in place; with lr 0 it only
    scores them (the validation figures, every word kept and full windows when asked).
    vectors/outputs: the input and output tables (float32, vocabulary x dim); keep: each id's keep
    probability; noise: the noise-word table (ids). words_done / words_total: this worker's words
    before these rows and over the whole run (the rate's schedule). Returns (loss sum, pair-accuracy
    sum, examples, words seen, the last rate)."""
    state = np.uint64(seed)
    dim = vectors.shape[1]
    kept = np.empty(rows.shape[1], np.int64)
    neu = np.empty(dim, np.float32)
    h = np.empty(dim, np.float32)
    loss, right, examples, seen = 0.0, 0.0, 0, 0
    rate = np.float32(lr)
    for r in range(rows.shape[0]):
        rate = np.float32(lr * max(1.0 - (words_done + seen) / words_total, MIN_RATE))  # from the words before this row
        n = 0
        for t in range(rows.shape[1]):
            w = rows[r, t]
            if w < 2:
                continue
            seen += 1
            stays, state = draw_kept(state, keep[w])
            if not stays:
                continue
            kept[n] = w
            n += 1
        for pos in range(n):
            reach = window
            if dynamic_window:
                state = _next(state)
                reach = window - np.int64(state % np.uint64(window))
            lo, hi = max(0, pos - reach), min(n, pos + reach + 1)
            if hi - lo < 2:
                continue
            word = kept[pos]
            if skipgram:  # each neighbour's vector predicts the word (gensim's order)
                for c in range(lo, hi):
                    if c == pos:
                        continue
                    a = vectors[kept[c]]
                    pl, pr, state = _example(a, outputs, word, noise, negatives, rate, neu, state)
                    for d in range(dim):
                        a[d] += neu[d]
                    loss += pl
                    right += pr / (negatives + 1)
                    examples += 1
            else:  # CBOW: the mean of the neighbours' vectors predicts the word; each gets the whole step
                h[:] = 0.0
                for c in range(lo, hi):
                    if c != pos:
                        h += vectors[kept[c]]
                h /= np.float32(hi - lo - 1)
                pl, pr, state = _example(h, outputs, word, noise, negatives, rate, neu, state)
                for c in range(lo, hi):
                    if c != pos:
                        vectors[kept[c]] += neu
                loss += pl
                right += pr / (negatives + 1)
                examples += 1
    return loss, right, examples, seen, rate
