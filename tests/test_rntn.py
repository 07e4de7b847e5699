"""Recursive neural tensor networks: the bracketed-tree reader (dl/bracketed.py), the level-by-level
batching of the RNTN against a node-by-node evaluation written from the notes' formula, the seeded
phrase generator's labels and held-out compositions, config errors; and (slow) generated trees
through land-file -> prepare -> train -> evaluate -> score on a real Spark, Delta and MLflow, the
registered pyfunc loaded where dlpipe cannot be imported."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dl import bracketed
from dl.models.rntn import RNTN, RNTNConfig
from dlpipe import phrases
from dlpipe.errors import ConfigError
from tests.conftest import WITHOUT_DLPIPE, make_config, read_table, stage, with_run


def test_bracketed_trees_are_binarized_and_errors_name_the_character():
    tree = bracketed.parse("(3 (2 Not) (3 good))", lowercase=True)
    assert tree.text() == "(3 (2 not) (3 good))" and tree.leaves() == ["not", "good"]
    assert [n.label for n in tree.nodes()] == ["2", "3", "3"]  # children first, the root last
    # Penn Treebank shapes: more than two children are right-factored, unary chains collapsed
    ptb = bracketed.parse("(S (NP (DT the) (NN cat)) (VP (VBZ sat)) (. .))")
    assert ptb.text() == "(S (NP (DT the) (NN cat)) (S (VP sat) (. .)))"
    for text, message in [("(3 (2 not) (3 good)", "character 1: this node is never closed"),
                          ("3 good", "character 1: expected '(' to open a node, got '3'"),
                          ("(3 good) (2 bad)", "character 10: text after the end of the tree"),
                          ("((2 not) (3 good))", "character 1: a node must start with its label"),
                          ("(3 (2 not) (3 good) x)", "character 21: expected ')', got 'x'"),
                          ("(3)", "character 1: node '3' has neither a word nor children"), ("  ", "empty tree")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            bracketed.parse(text)


def _reference(model: RNTN, tree, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Node by node, recursively, as the notes write it: p = tanh([a; b]^T V^[1:d] [a; b] + W [a; b] + b);
    returns (each node's class logits in post-order, the root's vector)."""
    logits = []

    def vector(node):
        if node.word is not None:
            v = model.embed.weight[ids[node.word]]
        else:
            c = torch.cat([vector(node.children[0]), vector(node.children[1])])
            tensor_term = torch.stack([c @ model.tensor[k] @ c for k in range(model.dim)])
            v = torch.tanh(tensor_term + model.layer.weight @ c + model.layer.bias)
        logits.append(model.head.weight @ v + model.head.bias)
        return v

    return logits, vector(tree)


def test_level_batching_gives_the_loss_of_node_by_node_evaluation():
    texts = ["(1 (2 not) (3 good))", "(4 (2 very) (3 good))", "(3 (2 (2 the) (2 film)) (3 (2 is) (3 (2 not) (1 bad))))",
             "(0 bad)", "(1 (3 (3 good) (2 (2 but) (1 dull))) (1 (2 and) (1 (2 not) (4 (2 very) (3 fine)))))"]
    trees = [bracketed.parse(t) for t in texts]
    ids = {w: i + 2 for i, w in enumerate(sorted({w for t in trees for w in t.leaves()}))}
    torch.manual_seed(0)
    model = RNTN(RNTNConfig(dim=6, vocab_size=len(ids) + 2), num_outputs=5)
    model.layer.bias.data.normal_()  # non-zero everywhere, so a wrong index shows
    rows = np.stack([bracketed.encode(t, ids.get, int, 16) for t in trees])  # padded beyond the largest (13 nodes)
    x = torch.from_numpy(rows)

    loss, right = model.objective(x, None)
    root_logits = model(x)

    per_node, roots = [], []
    for tree in trees:
        node_logits, _ = _reference(model, tree, ids)
        labels = torch.tensor([int(n.label) for n in tree.nodes()])
        per_node += [F.cross_entropy(torch.stack(node_logits), labels, reduction="none")]
        roots.append(node_logits[-1])
    expected = torch.cat(per_node).mean()
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(root_logits, torch.stack(roots), atol=1e-6)
    assert right == sum(int(r.argmax() == int(t.label)) for r, t in zip(roots, trees))
    # the gradients too, and the padding width changes nothing
    grads = torch.autograd.grad(loss, list(model.parameters()))
    reference = torch.autograd.grad(expected, list(model.parameters()))
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, reference))
    tight = torch.from_numpy(np.stack([bracketed.encode(t, ids.get, int, 13) for t in trees]))
    assert torch.allclose(model(tight), root_logits, atol=1e-6)
    plain = RNTN(RNTNConfig(dim=6, vocab_size=len(ids) + 2, tensor=False), num_outputs=5)
    assert plain.tensor.numel() == 0 and model(x).shape == plain(x).shape == (5, 5)


def _value(words: list[str]) -> int:
    """A phrase's sentiment from its words, written from the generator's docstring."""
    tail = words[len(words) - words[::-1].index("but"):] if "but" in words else words
    value = 1 if tail[-1] in phrases.POSITIVE else -1
    if any(w in phrases.INTENSIFIERS for w in tail):
        value *= 2
    return (-1 if value > 0 else 1) if "not" in tail else value


def test_generated_phrases_hold_out_negations_and_are_labelled_by_the_rules():
    sizes = {"train": 600, "dev": 100, "test": 200}
    made = phrases.generate(seed=3, sizes=sizes)
    assert made == phrases.generate(seed=3, sizes=sizes) and made != phrases.generate(seed=4, sizes=sizes)
    assert {k: len(v) for k, v in made.items()} == sizes
    assert len({t for rows in made.values() for t in rows}) == sum(sizes.values())  # no tree in two splits
    held = {s: sum(phrases.held_out_composition(bracketed.parse(t).leaves()) for t in rows) for s, rows in made.items()}
    assert held == {"train": 0, "dev": 0, "test": 100}
    for rows in made.values():
        for text in rows:
            tree = bracketed.parse(text)
            words = tree.leaves()
            assert int(tree.label) == _value(words) + 2, text
            for node in tree.nodes():  # words and noun phrases neutral, adjectives by polarity
                if node.word in phrases.NOUNS + phrases.DETERMINERS + ("not", "but"):
                    assert node.label == "2"
                if node.word in phrases.POSITIVE:
                    assert node.label == "3"
    negated_held_out = [w for t in made["test"] for w in [bracketed.parse(t).leaves()] if phrases.held_out_composition(w)]
    assert {w[-1] for w in negated_held_out} <= set(phrases.HELD_OUT)


def test_tree_configs_are_checked_before_spark_starts(tmp_path):
    with pytest.raises(ConfigError, match="'data.kind': model rntn reads trees"):
        make_config(tmp_path, "data.kind=text", conf="conf/phrases_rntn.yaml")
    with pytest.raises(ConfigError, match=r"'model.name': data.kind=trees is read by \['rntn'\], got 'mlp'"):
        make_config(tmp_path, "model.name=mlp", conf="conf/phrases_rntn.yaml")
    with pytest.raises(ConfigError, match="'data.trees.max_leaves': expected a positive integer, got 0"):
        make_config(tmp_path, "data.trees.max_leaves=0", conf="conf/phrases_rntn.yaml")
    with pytest.raises(ConfigError, match="'data.trees.split'"):
        make_config(tmp_path, "data.trees.split=folders", conf="conf/phrases_rntn.yaml")


CONSUMER = WITHOUT_DLPIPE + textwrap.dedent("""
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    long = "(3 " * 19 + "(3 good)" + " (2 ok))" * 19  # 20 leaves, more than any training tree
    out = model.predict(pd.DataFrame({"tree": ["(1 (2 not) (3 good))", "(3 (2 not) (1 zzunseen))", long]}))
    try:
        model.predict(pd.DataFrame({"tree": ["(3 good)", "(3 (2 not) good", 7]}))
        refused = ""
    except Exception as exc:
        refused = str(exc)
    print(json.dumps({"prediction": out["prediction"].tolist(), "probabilities": [p.tolist() for p in out["probabilities"]],
                      "refused": refused}))
""")


@pytest.mark.slow
def test_trees_through_prepare_train_evaluate_score_and_a_pyfunc_without_dlpipe(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    made = phrases.generate(seed=1, sizes={"train": 500, "dev": 60, "test": 80})
    too_long = "(3 " * 16 + "(3 good)" + " (2 ok))" * 16  # 17 leaves
    (landing / "train.txt").write_text("\n".join(made["train"] + ["(3 (2 not) (3 good)", too_long]) + "\n")
    (landing / "dev.txt").write_text("\n".join(made["dev"]) + "\n")
    (landing / "test.txt").write_text("\n".join(made["test"]) + "\n")
    (landing / "notes.txt").write_text(made["train"][0] + "\n")  # a file whose name gives no split
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.max_rejected_fraction=0.01", "train.epochs=3",
                      "train.backend=local", "train.batch_size=16", "model.rntn.dim=12", "registry.min_accuracy=0",
                      conf="conf/phrases_rntn.yaml")

    prepared = stage("prepare", spark, cfg)

    assert (prepared["accepted"], prepared["rejected"]) == (640, 3)
    rejected = read_table(prepared, "rejected").set_index("key")["reason"]
    assert rejected["train.txt:501"] == "line 501: not a bracketed tree: character 1: this node is never closed (missing ')')"
    assert rejected["train.txt:502"] == "line 502: 17 leaves, more than data.trees.max_leaves=16"
    assert rejected["notes.txt:1"] == "file notes.txt starts with none of train, dev, val, test (data.trees.split: files)"
    test = read_table(prepared, "test")
    assert sorted(test["tree"]) == sorted(made["test"]) and len(read_table(prepared, "val")) == 60
    row = test.iloc[0]
    assert len(row["nodes"]) == 5 * 31 and row["label_name"] == bracketed.parse(row["tree"]).label
    assert row["length"] == len(row["tokens"]) == len(bracketed.parse(row["tree"]).leaves())

    trained = stage("train", spark, cfg)
    evaluated = stage("evaluate", spark, with_run(cfg, trained["run_id"]))

    m = evaluated["metrics"]
    assert evaluated["champion"] and m["test_rows"] == 80 and 0 <= m["test_accuracy"] <= 1
    assert "val_node_accuracy" in trained["metrics"]
    scored = stage("score", spark, cfg, model="")
    import deltalake

    written = scored["predictions"]
    predictions = deltalake.DeltaTable(written["uri"], version=written["version"]).to_pandas()
    assert len(predictions) == 80 and written["rows_rejected"] == 0 and predictions["rejected_reason"].isna().all()
    truth = test.set_index("key")["label"]
    accuracy = (predictions.set_index("key")["prediction"] == truth.reindex(predictions["key"]).to_numpy()).mean()
    assert abs(accuracy - m["test_accuracy"]) < 1e-9

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    consumer = subprocess.run([sys.executable, "-I", "-c", CONSUMER, evaluated["model_uri"]], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path, env=env)
    assert consumer.returncode == 0, consumer.stderr[-2000:]
    out = json.loads(consumer.stdout.strip().splitlines()[-1])
    assert len(out["prediction"]) == 3 and all(abs(sum(p) - 1) < 1e-5 for p in out["probabilities"])
    assert "2 of 3 input rows rejected (row 1: not a bracketed tree: character 12: expected ')', got 'good'; " \
           "row 2: expected a string, got int)" in out["refused"]
    # the consumer's pyfunc gives what the trained net gives on the same tree
    from dlpipe.tracking import load_net

    net, meta = load_net(evaluated["model_uri"])
    vocab = {w: i for i, w in enumerate(meta["text"]["vocab"])}
    x = torch.from_numpy(bracketed.encode(bracketed.parse("(1 (2 not) (3 good))"), lambda w: vocab.get(w, 1), int)[None])
    assert np.allclose(torch.softmax(net(x), 1)[0].detach().numpy(), out["probabilities"][0], atol=1e-5)

