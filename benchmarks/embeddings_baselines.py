"""`dlpipe bench models --family embeddings`: the baselines and the scoring of the word2vec case.

- baselines: gensim's Word2Vec and Spark MLlib's Word2Vec trained on the same tokenized sentences;
  each returns its vocabulary, its vectors (float32, one row a word) and the wall seconds of
  training alone.
- scoring: the Google analogy questions (3CosAdd, like gensim's most_similar) and the WordSim353
  Spearman correlation, both from gensim's test data, lowercased and counted only on the
  vocabulary the compared models share (shared_vocab), so every model answers the same questions."""

from __future__ import annotations

import time

import numpy as np
from scipy.stats import spearmanr

CHUNK = 1024  # analogy questions scored per matrix product


def gensim_word2vec(sentences: list[list[str]], *, dim: int, window: int, negatives: int, epochs: int,
                    min_count: int, sample: float, sg: bool, threads: int, seed: int, alpha: float = 0.025,
                    min_alpha: float = 0.0001) -> dict:
    """gensim's Word2Vec with negative sampling (no hierarchical softmax), its rate falling linearly
    from alpha to min_alpha; seconds: build_vocab + train."""
    from gensim.models import Word2Vec

    model = Word2Vec(vector_size=dim, window=window, negative=negatives, hs=0, epochs=epochs, min_count=min_count,
                     sample=sample, sg=int(sg), workers=threads, seed=seed, alpha=alpha,
                     min_alpha=min_alpha)
    t0 = time.perf_counter()
    model.build_vocab(sentences)
    model.train(sentences, total_examples=model.corpus_count, epochs=model.epochs)
    seconds = time.perf_counter() - t0
    return {"words": list(model.wv.index_to_key), "vectors": np.asarray(model.wv.vectors, dtype=np.float32).copy(),
            "seconds": seconds}


def mllib_word2vec(spark, sentences: list[list[str]], *, dim: int, window: int, epochs: int, min_count: int,
                   partitions: int, seed: int, step: float = 0.025) -> dict:
    """Spark MLlib's Word2Vec (pyspark.ml.feature). It is skip-gram with hierarchical softmax: it has no
    negative sampling (so no negatives parameter) and no subsampling of frequent words. seconds: fit
    alone (the sentences' DataFrame is cached and counted first)."""
    from pyspark.ml.feature import Word2Vec

    df = spark.createDataFrame([(s,) for s in sentences], "tokens array<string>").cache()
    df.count()
    w2v = Word2Vec(vectorSize=dim, windowSize=window, maxIter=epochs, minCount=min_count, numPartitions=partitions,
                   seed=seed, stepSize=step, inputCol="tokens", outputCol="vector")
    try:
        t0 = time.perf_counter()
        model = w2v.fit(df)
        seconds = time.perf_counter() - t0
    finally:
        df.unpersist()
    rows = model.getVectors().collect()
    words = [r["word"] for r in rows]
    vectors = np.array([r["vector"].toArray() for r in rows], dtype=np.float32).reshape(len(rows), dim)
    return {"words": words, "vectors": vectors, "seconds": seconds}


def shared_vocab(*word_lists) -> set[str]:
    """The words every list holds."""
    if not word_lists:
        return set()
    common = set(word_lists[0])
    for words in word_lists[1:]:
        common &= set(words)
    return common


def _datapath(name: str) -> str:
    from gensim.test.utils import datapath

    return datapath(name)


def _unit(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms == 0, 1, norms)


def analogy_accuracy(words: list[str], vectors: np.ndarray, vocab: set[str] | None = None,
                     path: str | None = None) -> dict:
    """The Google analogy questions (a : b :: c : d), lowercased, counted when all four words are in vocab
    (default: all of words) and in words. The answer is the word nearest to b - a + c on unit vectors
    (3CosAdd), searched over all of words but a, b and c, like gensim's most_similar."""
    index = {w: i for i, w in enumerate(words)}
    allowed = index.keys() if vocab is None else vocab
    questions = []
    with open(path or _datapath("questions-words.txt"), encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith(":"):
                continue
            quad = line.lower().split()
            if len(quad) == 4 and all(w in allowed and w in index for w in quad):
                questions.append([index[w] for w in quad])
    if not questions:
        return {"accuracy": float("nan"), "questions": 0, "correct": 0}
    q = np.array(questions)
    unit = _unit(vectors)
    correct = 0
    for start in range(0, len(q), CHUNK):
        a, b, c, d = q[start:start + CHUNK].T
        scores = (unit[b] - unit[a] + unit[c]) @ unit.T
        rows = np.arange(len(a))
        scores[rows, a] = scores[rows, b] = scores[rows, c] = -np.inf
        correct += int((scores.argmax(axis=1) == d).sum())
    return {"accuracy": correct / len(q), "questions": len(q), "correct": correct}


def similarity_spearman(words: list[str], vectors: np.ndarray, vocab: set[str] | None = None,
                        path: str | None = None) -> dict:
    """WordSim353 (tab-separated word1, word2, human score; '#' lines are comments), lowercased, the pairs
    with both words in vocab (default: all of words) and in words: Spearman correlation between the human
    scores and the cosine similarities."""
    index = {w: i for i, w in enumerate(words)}
    allowed = index.keys() if vocab is None else vocab
    pairs, human = [], []
    with open(path or _datapath("wordsim353.tsv"), encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            w1, w2, score = line.lower().rstrip("\n").split("\t")[:3]
            if all(w in allowed and w in index for w in (w1, w2)):
                pairs.append((index[w1], index[w2]))
                human.append(float(score))
    if len(pairs) < 2:
        return {"spearman": float("nan"), "pairs": len(pairs)}
    unit = _unit(vectors)
    i, j = np.array(pairs).T
    cosines = (unit[i] * unit[j]).sum(axis=1)
    return {"spearman": float(spearmanr(human, cosines)[0]), "pairs": len(pairs)}
