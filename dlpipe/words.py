"""Word vectors of a registered word2vec model (dl/models/word2vec.py), read through its pyfunc as a
consumer would: the nearest words by cosine similarity, analogies (a is to b as c is to ?, by
b - a + c, as in the Google analogy questions), a 2-D projection of the frequent words, and the
rows of the <name>_embeddings table. The commands are `dlpipe words similar|analogy` and `dlpipe embed`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import mlflow
import numpy as np
import pandas as pd

from dlpipe import tracking
from dlpipe.errors import ConfigError, InputNotFound


@dataclass(frozen=True)
class Vectors:
    words: list[str]  # by frequency, most frequent first (the vocabulary's order, <pad> and <unk> left out)
    matrix: np.ndarray  # words x dim
    counts: list[int]  # training-corpus counts

    @cached_property
    def unit(self) -> np.ndarray:
        """The vectors scaled to length 1 (computed once per load)."""
        return self.matrix / np.maximum(np.linalg.norm(self.matrix, axis=1, keepdims=True), 1e-12)

    def index(self, word: str, flag: str) -> int:
        try:
            return self.words.index(word.strip().lower())
        except ValueError:
            raise ConfigError(f"{flag} {word!r}: not in the model's vocabulary of {len(self.words)} words") from None


def load(model_uri: str) -> Vectors:
    """Every word's vector, from the model's pyfunc (one batch of all its words); the model is
    downloaded once, its vocabulary and counts read from the meta.json inside it."""
    import json
    from pathlib import Path

    try:
        local = mlflow.artifacts.download_artifacts(model_uri)
        model = mlflow.pyfunc.load_model(local)
    except Exception as exc:  # an unknown run, name, version or alias
        raise InputNotFound(f"--model {model_uri}: cannot load it ({type(exc).__name__}: {str(exc)[:200]})") from None
    meta = json.loads(Path(local, "artifacts", "meta.json").read_text())
    if meta.get("task") != "embedding":
        raise ConfigError(f"--model {model_uri}: a {meta.get('task')} model, not word vectors (model.task embedding)")
    words = list(meta["text"]["vocab"][2:])
    counts = list(meta["net"]["params"]["counts"][2:])
    vectors = model.predict(pd.DataFrame({"word": words}))["vector"]
    return Vectors(words, np.stack(vectors.to_numpy()).astype(np.float32), counts)


def holdout(model_uri: str, uri: str, version: int, batch: int = 1024, seed: int = 0) -> dict:
    """test_loss (the negative-sampling loss per example) and test_pair_accuracy of the word2vec
    objective on a text table's rows: every word kept, full windows, noise words drawn from `seed`
    (so a champion and a challenger are judged on the same draws)."""
    import torch

    from dlpipe import lake

    module, _ = tracking.load_net(model_uri)
    ids = np.stack(lake.read_columns(uri, version, ["ids"]).to_pandas()["ids"].to_numpy()).astype(np.int64)
    loss = right = examples = 0.0
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for at in range(0, len(ids), batch):
            mean, correct, n = module.objective(torch.from_numpy(ids[at: at + batch]))
            loss, right, examples = loss + float(mean) * n, right + correct, examples + n
    return {"test_loss": loss / max(examples, 1), "test_pair_accuracy": right / max(examples, 1), "test_rows": len(ids)}


def nearest(v: Vectors, query: np.ndarray, k: int, exclude: set[int]) -> list[dict]:
    scores = v.unit @ (query / max(float(np.linalg.norm(query)), 1e-12))
    scores[list(exclude)] = -np.inf
    top = np.argsort(-scores)[:k]
    return [{"word": v.words[i], "similarity": float(scores[i])} for i in top]


def similar(v: Vectors, word: str, k: int) -> list[dict]:
    i = v.index(word, "--word")
    return nearest(v, v.unit[i], k, {i})


def analogy(v: Vectors, a: str, b: str, c: str, k: int) -> list[dict]:
    """a is to b as c is to ?: the words nearest b - a + c (of unit vectors), the three left out."""
    ia, ib, ic = (v.index(w, "analogy word") for w in (a, b, c))
    u = v.unit
    return nearest(v, u[ib] - u[ia] + u[ic], k, {ia, ib, ic})


def projection_figure(words: list[str], matrix: np.ndarray, shown: int = 150):
    """The `shown` most frequent words on the first two principal components of their vectors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = matrix[:shown] - matrix[:shown].mean(0)
    _, _, axes = np.linalg.svd(x, full_matrices=False)
    xy = x @ axes[:2].T
    fig, ax = plt.subplots(figsize=(11, 9))
    ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.4)
    for (px, py), word in zip(xy, words[:shown]):
        ax.annotate(word, (px, py), fontsize=7)
    ax.set(title=f"Word vectors: the {min(shown, len(words))} most frequent words, first two principal components",
           xlabel="PC 1", ylabel="PC 2")
    fig.tight_layout()
    return fig


def table_rows(v: Vectors) -> pd.DataFrame:
    """The <name>_embeddings rows of word vectors: word, vector, count."""
    return pd.DataFrame({"word": v.words, "vector": [row.tolist() for row in v.matrix], "count": v.counts})
