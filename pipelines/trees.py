"""data.kind: trees. Labelled bracketed trees, one per non-blank line, in the Penn Treebank /
Stanford Sentiment Treebank text format (`(3 (2 not) (3 good))`: a label on every node, a word at
every leaf); nodes with more than two children are binarized and unary chains collapsed
(dl/bracketed.py) -> <name>_train/_val/_test with
`key, source, label int, label_name string, tree string, tokens array<string>, nodes array<int>,
length int`: `label` is the root's class, `tree` the binary tree as text, `tokens` its leaves,
`nodes` the tree laid out for the RNTN (dl.bracketed.encode: 5 ints per node, padded to
2 * data.trees.max_leaves - 1 nodes) and `length` the number of leaves.

The split is the key's hash (data.trees.split: hash) or the file's name (files: train*, dev* or
val*, test*, as the treebanks ship). <name>_vocab is the text kind's: the leaves seen at least
min_count times in train, then the node labels (sorted, or data.trees.classes) in label order.
A line that does not parse, a tree with more than max_leaves leaves, or a label outside
data.trees.classes is rejected with the reason."""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from dl import bracketed
from pipelines import records
from pipelines.contract import record_parser
from pipelines.sources import Parser
from pipelines.split import hash_split
from pipelines.text import state_from_rows, state_rows  # noqa: F401  (the same vocabulary table)

BASE = ("train", "val", "test")
STATE = "vocab"
STATE_SCHEMA = "kind string, token string, id int, count long"
UNIT = "trees"
FILE_SPLITS = (("train", "train"), ("dev", "val"), ("val", "val"), ("test", "test"))  # file name prefix -> split


def parser(data, root: str, state: dict | None) -> Parser:
    t = data.trees
    classes = set((state or {}).get("classes") or t.classes)

    def convert(record: dict) -> dict:
        try:
            tree = bracketed.parse(record["text"], t.lowercase)
        except ValueError as exc:
            raise records.Invalid(f"not a bracketed tree: {exc}") from None
        leaves = tree.leaves()
        if len(leaves) > t.max_leaves:
            raise records.Invalid(f"{len(leaves)} leaves, more than data.trees.max_leaves={t.max_leaves}")
        labels = [n.label for n in tree.nodes()]
        if classes and not set(labels) <= classes:
            raise records.Invalid(f"label {sorted(set(labels) - classes)[0]!r} is not one of data.trees.classes {sorted(classes)}")
        return {"label_name": tree.label, "tree": tree.text(), "tokens": leaves, "labels": labels}

    return record_parser(root, "lines", t.encoding, "",
                         "label_name string, tree string, tokens array<string>, labels array<string>", convert)


def assign_split(df: DataFrame, data) -> DataFrame:
    if data.trees.split == "hash":
        return hash_split(df, data.split_fractions)
    name = F.lower(F.element_at(F.split("source", "/"), -1))
    split = F.lit(None).cast("string")
    for prefix, target in reversed(FILE_SPLITS):
        split = F.when(name.startswith(prefix), target).otherwise(split)
    return (df.withColumn("split", F.coalesce(split, F.lit("rejected")))
            .withColumn("error", F.when(split.isNull(), F.concat(
                F.lit("file "), name, F.lit(" starts with none of train, dev, val, test (data.trees.split: files)")))
                        .otherwise(F.col("error"))))


def fit(accepted: DataFrame, data) -> dict:
    t = data.trees
    counts = (accepted.where(F.col("split") == "train").select(F.explode("tokens").alias("token"))
              .groupBy("token").count().where(F.col("count") >= t.min_count)
              .orderBy(F.desc("count"), "token").limit(t.max_vocab).collect())
    classes = list(t.classes) or sorted(r["label"] for r in accepted.select(F.explode("labels").alias("label"))
                                        .distinct().collect())
    return {"vocab": [(r["token"], r["count"]) for r in counts], "classes": classes}


def to_base(accepted: DataFrame, data, state: dict) -> DataFrame:
    width = 2 * data.trees.max_leaves - 1
    lowercase = data.trees.lowercase
    ids = {token: i + 2 for i, (token, _) in enumerate(state["vocab"])}
    label_of = {name: i for i, name in enumerate(state["classes"])}

    def encode(batches):
        for batch in batches:
            nodes = [bracketed.encode(bracketed.parse(text, lowercase), lambda w: ids.get(w, 1),
                                      lambda label: label_of.get(label, -1), width) for text in batch["tree"]]
            yield pd.DataFrame({
                "key": batch["key"], "source": batch["source"], "split": batch["split"],
                "label": batch["label_name"].map(label_of).astype("Int32"), "label_name": batch["label_name"],
                "tree": batch["tree"], "tokens": batch["tokens"], "nodes": nodes,
                "length": batch["tokens"].map(len).astype("int32"),
            })

    return accepted.mapInPandas(encode, "key string, source string, split string, label int, label_name string, "
                                        "tree string, tokens array<string>, nodes array<int>, length int")


def derive(tables: dict, data, state) -> dict:
    return {}


def report(tables: dict, data, state, written: dict) -> dict:
    """Leaves per tree and trees per root class, over every row of the written tables."""
    frames = [tables[s].select("length", "label_name") for s in BASE]
    rows = frames[0].unionByName(frames[1]).unionByName(frames[2])
    s = rows.agg(F.min("length").alias("min"), F.mean("length").alias("mean"), F.max("length").alias("max")).first()
    roots = {r["label_name"]: r["count"] for r in rows.groupBy("label_name").count().collect()}
    return {"vocab_size": len(state["vocab"]) + 2, "classes": state["classes"], "root_classes": roots,
            "leaves": {"min": s["min"], "mean": s["mean"], "max": s["max"], "max_leaves": data.trees.max_leaves}}

