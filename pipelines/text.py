"""data.kind: text. Labelled documents (csv / jsonl / parquet with a text and a label column)
or a raw corpus (format: lines, every non-blank line a document), tokenized into words or (data.text.unit:
char) characters -> <name>_train/_val/_test with
`key, source, label int, label_name string, text string, tokens array<string>, ids array<int>,
length int` (label and label_name null for a corpus). `ids` are the token ids padded with 0
or truncated to data.text.max_length; `length` is the token count before truncation.

<name>_vocab `kind string, token string, id int, count long` is fitted on the train split only:
kind=token rows are the tokens seen at least min_count times (at most max_vocab, most frequent
first; id 0 = <pad>, 1 = <unk>), kind=label rows the classes in label order. Append and merge
reuse it, so ids never change meaning. Empty text (and text without a single token) is rejected.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines import records
from pipelines.contract import record_parser
from pipelines.sources import Parser
from pipelines.split import hash_split

BASE = ("train", "val", "test")
STATE = "vocab"
STATE_SCHEMA = "kind string, token string, id int, count long"
UNIT = "rows"
PAD, UNK = "<pad>", "<unk>"
TOKEN = re.compile(r"\w+(?:'\w+)*")


def tokenize(text: str, lowercase: bool, unit: str = "word") -> list[str]:
    """Words (runs of \\w, inner apostrophes kept) or, for unit "char", every character. The served
    recurrent models carry TOKEN.pattern and repeat this (dlpipe/pyfunc_sequence.py)."""
    text = text.lower() if lowercase else text
    return list(text) if unit == "char" else TOKEN.findall(text)


def parser(data, root: str, state: dict | None) -> Parser:
    t = data.text
    classes = (state or {}).get("classes") or t.classes
    column = "text" if t.format == "lines" else t.text

    def convert(record: dict) -> dict:
        value = record.get(column)
        if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
            raise records.Invalid(f"empty text in column {column!r}")
        body = str(value).strip()
        tokens = tokenize(body, t.lowercase, t.unit)
        if not tokens:
            raise records.Invalid(f"empty text in column {column!r}: no word tokens in {body[:40]!r}")
        label = None
        if t.label:
            label = records.text(record, t.label)
            if classes and label not in classes:
                raise records.Invalid(f"label {t.label!r}: {label!r} is not one of the classes {classes}")
        return {"label_name": label, "text": body, "tokens": tokens}

    return record_parser(root, t.format, t.encoding, t.key,
                       "label_name string, text string, tokens array<string>", convert)


def assign_split(df: DataFrame, data) -> DataFrame:
    return hash_split(df, data.split_fractions)


def fit(accepted: DataFrame, data) -> dict:
    t = data.text
    counts = (accepted.where(F.col("split") == "train").select(F.explode("tokens").alias("token"))
              .groupBy("token").count().where(F.col("count") >= t.min_count)
              .orderBy(F.desc("count"), "token").limit(t.max_vocab).collect())
    classes = list(t.classes)
    if t.label and not classes:
        classes = sorted(r["label_name"] for r in accepted.select("label_name").distinct().collect())
    return {"vocab": [(r["token"], r["count"]) for r in counts], "classes": classes}


def state_rows(state: dict) -> pd.DataFrame:
    rows = [("token", PAD, 0, 0), ("token", UNK, 1, 0)]
    rows += [("token", token, i + 2, count) for i, (token, count) in enumerate(state["vocab"])]
    rows += [("label", name, i, 0) for i, name in enumerate(state["classes"])]
    return pd.DataFrame(rows, columns=["kind", "token", "id", "count"])


def state_from_rows(pdf: pd.DataFrame) -> dict:
    tokens = pdf[(pdf["kind"] == "token") & (pdf["id"] >= 2)].sort_values("id")
    return {"vocab": list(zip(tokens["token"], tokens["count"])),
            "classes": list(pdf[pdf["kind"] == "label"].sort_values("id")["token"])}


def to_base(accepted: DataFrame, data, state: dict) -> DataFrame:
    length = data.text.max_length
    ids = {token: i + 2 for i, (token, _) in enumerate(state["vocab"])}
    label_of = {name: i for i, name in enumerate(state["classes"])}

    def encode(batches):
        for batch in batches:
            sequences = []
            for tokens in batch["tokens"]:
                seq = np.zeros(length, dtype=np.int32)
                head = [ids.get(tok, 1) for tok in tokens[:length]]
                seq[: len(head)] = head
                sequences.append(seq)
            yield pd.DataFrame({
                "key": batch["key"], "source": batch["source"], "split": batch["split"],
                "label": batch["label_name"].map(label_of).astype("Int32"), "label_name": batch["label_name"],
                "text": batch["text"], "tokens": batch["tokens"], "ids": sequences,
                "length": batch["tokens"].map(len).astype("int32"),
            })

    return accepted.mapInPandas(encode, "key string, source string, split string, label int, label_name string, "
                                        "text string, tokens array<string>, ids array<int>, length int")


def derive(tables: dict, data, state) -> dict:
    return {}


def report(tables: dict, data, state, written: dict) -> dict:
    """Token counts per document over every row of the written tables."""
    frames = [tables[s].select("length") for s in BASE]
    lengths = frames[0].unionByName(frames[1]).unionByName(frames[2])
    row = lengths.agg(F.min("length").alias("min"), F.mean("length").alias("mean"),
                      F.percentile_approx("length", [0.5, 0.95]).alias("p"), F.max("length").alias("max"),
                      F.mean((F.col("length") > data.text.max_length).cast("double")).alias("truncated")).first()
    return {"vocab_size": len(state["vocab"]) + 2, "classes": state["classes"],
            "length": {"min": row["min"], "mean": row["mean"], "p50": row["p"][0] if row["p"] else None,
                       "p95": row["p"][1] if row["p"] else None, "max": row["max"],
                       "max_length": data.text.max_length, "truncated_fraction": row["truncated"]}}
