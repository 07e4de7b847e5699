"""The word2vec benchmark's scoring and gensim baseline (benchmarks/embeddings_baselines.py): analogies
by 3CosAdd on vectors built so that they hold (and agreeing with gensim's own evaluation), WordSim
Spearman against a hand computation, and gensim's Word2Vec separating two topics of a tiny corpus."""

import math
import random

import numpy as np
from scipy.stats import spearmanr

from benchmarks.embeddings_baselines import analogy_accuracy, gensim_word2vec, shared_vocab, similarity_spearman

# axes: male, female, adult, royal, family, fruit, colour; every word has norm sqrt(2)
AXES = ["male", "female", "adult", "royal", "family", "fruit", "colour"]
WORDS = {
    "man": ("male", "adult"), "woman": ("female", "adult"),
    "king": ("male", "royal"), "queen": ("female", "royal"),
    "uncle": ("male", "family"), "aunt": ("female", "family"),
    "apple": ("fruit", "colour"), "red": ("colour", "adult"),
}
QUESTIONS = """: gender
man woman king queen
King Queen Man Woman
man woman uncle aunt
uncle aunt king queen
queen king aunt uncle
woman man queen king
: other
aunt uncle woman man
man woman kingdom queendom
"""


def _vectors():
    words = list(WORDS)
    vectors = np.zeros((len(words), len(AXES)), dtype=np.float32)
    for i, w in enumerate(words):
        for axis in WORDS[w]:
            vectors[i, AXES.index(axis)] = 1
    return words, vectors


def _questions(tmp_path, text=QUESTIONS):
    path = tmp_path / "questions.txt"
    path.write_text(text)
    return str(path)


def test_analogies_built_to_hold_are_all_answered(tmp_path):
    words, vectors = _vectors()
    r = analogy_accuracy(words, vectors, path=_questions(tmp_path))
    # the kingdom line has words outside the vectors; the capitalized line counts lowercased
    assert r == {"accuracy": 1.0, "questions": 7, "correct": 7}
    scrambled = vectors[np.random.default_rng(0).permutation(len(words))]
    s = analogy_accuracy(words, scrambled, path=_questions(tmp_path))
    assert s["questions"] == 7 and s["accuracy"] < 1.0


def test_analogies_count_only_the_shared_vocabulary(tmp_path):
    words, vectors = _vectors()
    vocab = set(words) - {"queen"}
    r = analogy_accuracy(words, vectors, vocab=vocab, path=_questions(tmp_path))
    assert r == {"accuracy": 1.0, "questions": 2, "correct": 2}  # man:woman::uncle:aunt, aunt:uncle::woman:man
    # queen is still a candidate answer when it is in words (vocab only picks the questions)
    r = analogy_accuracy(words, vectors, vocab={"man", "woman", "uncle", "king"},
                         path=_questions(tmp_path, "man woman uncle king\n"))
    assert r == {"accuracy": 0.0, "questions": 1, "correct": 0}


def test_analogies_exclude_the_question_words(tmp_path):
    # b - a + c is nearest to c itself; 3CosAdd must skip it and answer d
    words = ["a", "b", "c", "d"]
    vectors = np.array([[1, 0, 0], [1, 0.1, 0], [0, 0, 1], [0, 0.3, 1]], dtype=np.float32)
    r = analogy_accuracy(words, vectors, path=_questions(tmp_path, "a b c d\n"))
    assert r["correct"] == 1


def test_analogies_agree_with_gensim(tmp_path):
    from gensim.models import KeyedVectors

    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(40)]
    vectors = rng.normal(size=(len(words), 6)).astype(np.float32)
    lines = [": random"] + [" ".join(random.Random(i).sample(words, 4)) for i in range(300)]
    path = _questions(tmp_path, "\n".join(lines) + "\n")
    kv = KeyedVectors(6)
    kv.add_vectors(words, vectors)
    expected, _ = kv.evaluate_word_analogies(path)
    r = analogy_accuracy(words, vectors, path=path)
    assert r["questions"] == 300 and 0 < r["correct"] < 300
    assert math.isclose(r["accuracy"], expected)


def test_similarity_spearman_equals_the_hand_computation(tmp_path):
    angles = {"cat": 0.0, "tiger": 0.3, "dog": 0.9, "car": 2.0, "train": 2.4, "sky": 3.1}
    words = list(angles)
    vectors = np.array([[2 * math.cos(a), 2 * math.sin(a)] for a in angles.values()], dtype=np.float32)
    rows = [("cat", "Tiger", 8.0), ("cat", "dog", 7.5), ("dog", "car", 6.0), ("car", "train", 7.0),
            ("cat", "sky", 1.0), ("tiger", "train", 3.0), ("dog", "sky", 0.5)]
    path = tmp_path / "ws.tsv"
    path.write_text("# a comment\n# Word 1\tWord 2\tHuman (mean)\n"
                    + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows)
                    + "cat\tunicorn\t5.0\n")
    cosines = [math.cos(angles[a] - angles[b.lower()]) for a, b, _ in rows]
    expected = spearmanr([s for _, _, s in rows], cosines)[0]
    r = similarity_spearman(words, vectors, path=str(path))
    assert r["pairs"] == len(rows)
    assert math.isclose(r["spearman"], expected, abs_tol=1e-9) and expected < 0.99
    # outside the shared vocabulary: the sky pairs drop
    r = similarity_spearman(words, vectors, vocab=set(words) - {"sky"}, path=str(path))
    keep = [i for i, (a, b, _) in enumerate(rows) if "sky" not in (a, b)]
    assert r["pairs"] == len(keep)
    assert math.isclose(r["spearman"], spearmanr([rows[i][2] for i in keep], [cosines[i] for i in keep])[0],
                        abs_tol=1e-9)


def test_shared_vocab():
    assert shared_vocab(["a", "b", "c"], ("b", "c", "d"), {"c", "b", "e"}) == {"b", "c"}
    assert shared_vocab(["a"]) == {"a"}


def test_gensim_word2vec_puts_topic_mates_nearer():
    rng = random.Random(0)
    topics = [[f"sea{i}" for i in range(8)], [f"desk{i}" for i in range(8)]]
    sentences = [rng.choices(topics[n % 2], k=8) for n in range(3000)]
    r = gensim_word2vec(sentences, dim=16, window=3, negatives=5, epochs=3, min_count=1, sample=0.0, sg=True,
                        threads=1, seed=1)
    words, vectors = r["words"], r["vectors"]
    assert sorted(words) == sorted(topics[0] + topics[1])
    assert vectors.dtype == np.float32 and vectors.shape == (16, 16) and r["seconds"] > 0
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = {w: i for i, w in enumerate(words)}
    for mine, other in (topics, topics[::-1]):
        for w in mine:
            mate = max(unit[index[w]] @ unit[index[m]] for m in mine if m != w)
            stranger = max(unit[index[w]] @ unit[index[o]] for o in other)
            assert mate > stranger, w
