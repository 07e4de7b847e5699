"""data.kind: table. CSV / JSON lines / Parquet rows with a declared label column ->
`key string, source string, label int, label_name string, features array<float>` (classification)
or `key, source, label double, features` (regression) in <name>_train/_val/_test.

Numeric columns are standardized and categorical columns one-hot encoded, with statistics and
vocabularies fitted on the train split only and stored in <name>_stats (one row per feature
position, plus one per class), so that scoring applies exactly the same transform:
    x[index] = (value - mean) / std              kind = numeric
    x[index] = 1.0 if value == category else 0.0  kind = categorical (unseen values: all 0)
    label    = index of label_name               kind = label
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines import records
from pipelines.contract import parse_files
from pipelines.split import hash_split

BASE = ("train", "val", "test")
STATE = "stats"
STATE_SCHEMA = "kind string, column string, value string, index int, mean double, std double"
UNIT = "rows"


def parse(files: DataFrame, data, root: str, state: dict | None) -> DataFrame:
    t = data.table
    classes = (state or {}).get("classes") or t.classes
    classification = t.task == "classification"

    def convert(record: dict) -> dict:
        out = {"num": [records.number(record, c) for c in t.numeric],
               "cat": [records.text(record, c) for c in t.categorical]}
        if classification:
            name = records.text(record, t.label)
            if classes and name not in classes:
                raise records.Invalid(f"label {t.label!r}: {name!r} is not one of the classes {classes}")
            out["label_name"], out["target"] = name, None
        else:
            out["label_name"], out["target"] = None, records.number(record, t.label)
        return out

    return parse_files(files, root, t.format, "utf-8", t.key,
                       "label_name string, target double, num array<double>, cat array<string>", convert)


def assign_split(df: DataFrame, data) -> DataFrame:
    return hash_split(df, data.split_fractions)


def fit(accepted: DataFrame, data) -> dict:
    """Mean/std of each numeric column and the values of each categorical column, on train rows."""
    t = data.table
    train = accepted.where(F.col("split") == "train")
    moments = {r["pos"]: (r["mean"], r["std"]) for r in train.select(F.posexplode("num")).groupBy("pos").agg(
        F.mean("col").alias("mean"), F.stddev_pop("col").alias("std")).collect()}
    values: dict[int, list[str]] = {}
    for r in train.select(F.posexplode("cat")).distinct().collect():
        values.setdefault(r["pos"], []).append(r["col"])
    classes = list(t.classes)
    if t.task == "classification" and not classes:
        classes = sorted(r["label_name"] for r in accepted.select("label_name").distinct().collect())
    return {"numeric": [(c, *moments.get(i, (0.0, 1.0))) for i, c in enumerate(t.numeric)],
            "categorical": [(c, sorted(values.get(i, []))) for i, c in enumerate(t.categorical)],
            "classes": classes}


def state_rows(state: dict) -> pd.DataFrame:
    rows, index = [], 0
    for column, mean, std in state["numeric"]:
        rows.append(("numeric", column, None, index, float(mean), float(std)))
        index += 1
    for column, values in state["categorical"]:
        for value in values:
            rows.append(("categorical", column, value, index, None, None))
            index += 1
    rows += [("label", None, name, i, None, None) for i, name in enumerate(state["classes"])]
    return pd.DataFrame(rows, columns=["kind", "column", "value", "index", "mean", "std"])


def state_from_rows(pdf: pd.DataFrame) -> dict:
    pdf = pdf.sort_values("index")
    numeric = [(r.column, r.mean, r.std) for r in pdf[pdf["kind"] == "numeric"].itertuples()]
    cats = pdf[pdf["kind"] == "categorical"]
    categorical = [(c, list(cats.loc[cats["column"] == c, "value"])) for c in dict.fromkeys(cats["column"])]
    return {"numeric": numeric, "categorical": categorical,
            "classes": list(pdf.loc[pdf["kind"] == "label", "value"])}


def to_base(accepted: DataFrame, data, state: dict) -> DataFrame:
    classification = data.table.task == "classification"
    mean = np.array([m for _, m, _ in state["numeric"]], dtype=np.float64)
    std = np.array([s if s and s > 0 else 1.0 for _, _, s in state["numeric"]], dtype=np.float64)
    vocabularies = [{v: i for i, v in enumerate(values)} for _, values in state["categorical"]]
    width = len(mean) + sum(len(v) for v in vocabularies)
    label_of = {name: i for i, name in enumerate(state["classes"])}

    def transform(batches):
        for batch in batches:
            n = len(batch)
            x = np.zeros((n, width), dtype=np.float32)
            if len(mean):
                x[:, : len(mean)] = (np.stack(batch["num"].to_numpy()) - mean) / std
            offset = len(mean)
            for j, vocab in enumerate(vocabularies):
                for i, values in enumerate(batch["cat"]):
                    hit = vocab.get(values[j])
                    if hit is not None:
                        x[i, offset + hit] = 1.0
                offset += len(vocab)
            out = pd.DataFrame({"key": batch["key"], "source": batch["source"], "split": batch["split"]})
            if classification:
                out["label"] = batch["label_name"].map(label_of).astype("int32")
                out["label_name"] = batch["label_name"]
            else:
                out["label"] = batch["target"].astype("float64")
            out["features"] = list(x)
            yield out

    schema = ("key string, source string, split string, label int, label_name string, features array<float>"
              if classification else "key string, source string, split string, label double, features array<float>")
    return accepted.mapInPandas(transform, schema)


def derive(tables: dict, data, state) -> dict:
    return {}


def report(tables: dict, data, state, written: dict) -> dict:
    return {"features": len(state["numeric"]) + sum(len(v) for _, v in state["categorical"]),
            "classes": state["classes"]}
