"""Bracketed trees, the text format of the Penn Treebank and the Stanford Sentiment Treebank:
`(3 (2 not) (3 (2 very) (4 good)))`, a label after every opening bracket, a word at every leaf.
Plain Python and numpy, nothing else: prepare (pipelines/trees.py) and the served model
(dlpipe/pyfunc_sequence.py, which carries this file) encode trees with the same code.

`parse` reads one tree; a node with more than two children is binarized right-factored (its
label carried down to the new nodes) and a node with one child is collapsed into it (the upper
label kept), so every tree the models see is binary. `encode` lays a tree out as the fixed-width
integer rows the RNTN takes (dl/models/rntn.py): one row of FIELDS per node, children before
parents, the root last, then padding rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIELDS = ("word", "left", "right", "label", "height")  # per node; -1 where a field does not apply, all -1: padding
WIDTH = len(FIELDS)


@dataclass
class Tree:
    label: str
    word: str | None = None  # leaves only
    children: list["Tree"] = field(default_factory=list)

    def leaves(self) -> list[str]:
        return [self.word] if self.word is not None else [w for c in self.children for w in c.leaves()]

    def nodes(self) -> list["Tree"]:
        """Post-order: children before their parent, the root last."""
        return [self] if self.word is not None else [n for c in self.children for n in c.nodes()] + [self]

    def text(self) -> str:
        return f"({self.label} {self.word})" if self.word is not None else \
            f"({self.label} {' '.join(c.text() for c in self.children)})"


def parse(text: str, lowercase: bool = False) -> Tree:
    """One bracketed tree -> a binary Tree; ValueError naming the character where it goes wrong."""
    tokens, at = _tokens(text), 0
    if not tokens:
        raise ValueError("empty tree: expected text like (3 (2 not) (3 good))")

    def node() -> Tree:
        nonlocal at
        pos, tok = tokens[at]
        if tok != "(":
            raise ValueError(f"character {pos + 1}: expected '(' to open a node, got {tok!r}")
        if at + 1 >= len(tokens) or tokens[at + 1][1] in "()":
            raise ValueError(f"character {pos + 1}: a node must start with its label, as in (3 good)")
        label, at = tokens[at + 1][1], at + 2
        if at < len(tokens) and tokens[at][1] not in "()":  # a leaf: (label word)
            word, at = tokens[at][1], at + 1
            _close(tokens, at, pos)
            at += 1
            return Tree(label, word.lower() if lowercase else word)
        children = []
        while at < len(tokens) and tokens[at][1] == "(":
            children.append(node())
        _close(tokens, at, pos)
        at += 1
        if not children:
            raise ValueError(f"character {pos + 1}: node {label!r} has neither a word nor children")
        return _binary(label, children)

    tree = node()
    if at != len(tokens):
        raise ValueError(f"character {tokens[at][0] + 1}: text after the end of the tree: {tokens[at][1]!r}")
    return tree


def _tokens(text: str) -> list[tuple[int, str]]:
    out, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text[i] in "()":
            out.append((i, text[i]))
            i += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in "()":
                j += 1
            out.append((i, text[i:j]))
            i = j
    return out


def _close(tokens, at: int, opened: int) -> None:
    if at >= len(tokens):
        raise ValueError(f"character {opened + 1}: this node is never closed (missing ')')")
    if tokens[at][1] != ")":
        raise ValueError(f"character {tokens[at][0] + 1}: expected ')', got {tokens[at][1]!r}")


def _binary(label: str, children: list[Tree]) -> Tree:
    if len(children) == 1:  # a unary chain: the child's subtree under the upper label
        child = children[0]
        return Tree(label, child.word, child.children)
    if len(children) == 2:
        return Tree(label, None, children)
    return Tree(label, None, [children[0], _binary(label, children[1:])])


def encode(tree: Tree, word_id, label_id, nodes: int = 0) -> np.ndarray:
    """(max(nodes, tree's nodes) x WIDTH) int32 rows, flattened: per node its word id (leaves), its
    children's row numbers, its label id (-1: none) and its height (leaves 0); padding rows are -1."""
    order = tree.nodes()
    out = np.full((max(nodes, len(order)), WIDTH), -1, np.int32)
    row = {id(n): i for i, n in enumerate(order)}
    for i, n in enumerate(order):
        if n.word is not None:
            out[i] = (word_id(n.word), -1, -1, label_id(n.label), 0)
        else:
            left, right = row[id(n.children[0])], row[id(n.children[1])]
            out[i] = (-1, left, right, label_id(n.label), 1 + max(out[left, 4], out[right, 4]))
    return out.reshape(-1)
