"""A seeded generator of labelled sentiment phrases as bracketed binary trees, in the Stanford
Sentiment Treebank's format and labels (0 very negative, 1 negative, 2 neutral, 3 positive,
4 very positive, on every node). No sentiment treebank installs offline, so `dlpipe land` with
data.dataset: sentiment_phrases writes these as train.txt, dev.txt and test.txt.

The grammar: an adjective phrase is an adjective (positive +1, negative -1), an intensified one
("very good": +2), a negated one ("not good": -1, "not bad": +1) or a negated intensified one
("not very good": -1, "not very bad": +1); a sentence puts one after a noun phrase and a verb
("the plot is not very bad"); a contrast joins two with "but" and takes the second's value ("the
film is good but the ending is dull"). Words and noun phrases are neutral.

Held-out compositions: the negations of HELD_OUT adjectives never appear in train or dev (the
adjectives themselves do, plain and intensified); test holds them, half of its rows, beside fresh
phrases of every kind. A bag of words cannot tell "not good" (negative) from "not bad" (positive)
given "good" and "bad"; a composing model can."""

from __future__ import annotations

import numpy as np

POSITIVE = ("good", "great", "fine", "nice", "pleasant", "superb", "lovely", "brilliant", "charming", "clever",
            "solid", "wonderful")
NEGATIVE = ("bad", "awful", "poor", "dull", "boring", "weak", "terrible", "bland", "clumsy", "tedious", "mediocre",
            "dreadful")
HELD_OUT = ("lovely", "clever", "superb", "dull", "clumsy", "bland")  # never negated in train or dev
INTENSIFIERS = ("very", "really", "extremely", "truly")
NOUNS = ("movie", "film", "plot", "story", "acting", "script", "cast", "ending", "music", "dialogue")
DETERMINERS = ("the", "this")
VERBS = ("is", "was", "seems")
SIZES = {"train": 8000, "dev": 1000, "test": 2000}


def _leaf(word: str, value: int = 0) -> tuple[str, int]:
    return f"({value + 2} {word})", value


def _node(left: tuple[str, int], right: tuple[str, int], value: int) -> tuple[str, int]:
    return f"({value + 2} {left[0]} {right[0]})", value


def _adjective_phrase(rng: np.random.Generator, adjectives, held_out: bool = False) -> tuple[str, int]:
    """held_out: a negated HELD_OUT adjective; otherwise a HELD_OUT adjective is never negated."""
    adjective = adjectives[rng.integers(len(adjectives))]
    phrase = _leaf(adjective, 1 if adjective in POSITIVE else -1)
    if rng.random() < 0.45:
        phrase = _node(_leaf(INTENSIFIERS[rng.integers(len(INTENSIFIERS))]), phrase, 2 * phrase[1])
    if held_out or (adjective not in HELD_OUT and rng.random() < 0.5):
        phrase = _node(_leaf("not"), phrase, -1 if phrase[1] > 0 else 1)
    return phrase


def _sentence(rng: np.random.Generator, adjective_phrase: tuple[str, int]) -> tuple[str, int]:
    if rng.random() < 0.3:
        return adjective_phrase
    subject = _node(_leaf(DETERMINERS[rng.integers(2)]), _leaf(NOUNS[rng.integers(len(NOUNS))]), 0)
    predicate = _node(_leaf(VERBS[rng.integers(len(VERBS))]), adjective_phrase, adjective_phrase[1])
    return _node(subject, predicate, predicate[1])


def phrase(rng: np.random.Generator, held_out: bool) -> str:
    """One tree. held_out: the decisive (last) adjective phrase negates a HELD_OUT adjective;
    otherwise no HELD_OUT adjective is ever negated."""
    decisive = _adjective_phrase(rng, HELD_OUT, True) if held_out else _adjective_phrase(rng, POSITIVE + NEGATIVE)
    last = _sentence(rng, decisive)
    if rng.random() < 0.3:  # a contrast: the part after "but" decides
        first = _sentence(rng, _adjective_phrase(rng, POSITIVE + NEGATIVE))
        last = _node(first, _node(_leaf("but"), last, last[1]), last[1])
    return last[0]


def generate(seed: int = 0, sizes: dict[str, int] = SIZES) -> dict[str, list[str]]:
    """{train, dev, test: distinct trees}; no tree is in two splits; half of test is held-out compositions."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for split in ("train", "dev", "test"):
        rows: list[str] = []
        while len(rows) < sizes[split]:
            tree = phrase(rng, held_out=split == "test" and len(rows) % 2 == 0)
            if tree not in seen:
                seen.add(tree)
                rows.append(tree)
        out[split] = rows
    return out


def decisive(words: list[str]) -> list[str]:
    """The words that decide a phrase's label: those after the last "but", or all."""
    return words[len(words) - words[::-1].index("but"):] if "but" in words else words


def negated(words: list[str]) -> bool:
    return "not" in decisive(words)


def held_out_composition(words: list[str]) -> bool:
    """A negated HELD_OUT adjective decides the phrase."""
    tail = decisive(words)
    return "not" in tail and any(w in HELD_OUT for w in tail)
