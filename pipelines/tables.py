"""data.kind: table. CSV / JSON lines / Parquet rows with a declared label column ->
`key string, source string, label int, label_name string, features binary` (classification;
features are float32 bytes, dlpipe.tensors: Spark readers of lake.read_table get array<float>)
or `key, source, label double, features` (regression) in <name>_train/_val/_test.

Numeric columns are standardized and categorical columns one-hot encoded, with statistics and
vocabularies fitted on the train split only and stored in <name>_stats (one row per feature
position, plus one per class), so that scoring applies exactly the same transform:
    x[index] = (value - mean) / std              kind = numeric
    x[index] = 1.0 if value == category else 0.0  kind = categorical (unseen values: all 0)
    label    = index of label_name               kind = label
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from dlpipe import tensors
from pipelines import records
from pipelines.contract import record_parser
from pipelines.sources import Parser, arrow_schema, split_by_key

BASE = ("train", "val", "test")
STATE = "stats"
STATE_SCHEMA = "kind string, column string, value string, index int, mean double, std double"
UNIT = "rows"


def parser(data, root: str, state: dict | None) -> Parser:
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

    fast = _fast_csv(t, classes) if t.format == "csv" and t.key else None
    rows = record_parser(root, t.format, "utf-8", t.key,
                         "label_name string, target double, num array<double>, cat array<string>", convert, fast)
    return split_by_key(dataclasses.replace(rows, part=None if state else fit_part(data)), data.split_fractions)


def _fast_csv(t, classes: list[str]):
    """A whole CSV file parsed with pyarrow and checked column by column; None (the file takes
    the record-by-record path, which names each bad row) for anything that is not plain: quotes
    or blank lines (line numbers), a missing column or field, an empty, non-numeric or infinite
    value, a duplicate header, an unknown label."""
    import io

    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    columns = list(dict.fromkeys([t.key, t.label, *t.numeric, *t.categorical]))
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=columns,
                                   strings_can_be_null=False)

    def fast(content: bytes) -> dict | None:
        if b'"' in content or b"\r" in content or b"\n\n" in content.strip(b"\n"):
            return None
        try:
            table = pacsv.read_csv(io.BytesIO(content), read_options=pacsv.ReadOptions(use_threads=False),
                                   convert_options=convert)
            values = {c: pc.utf8_trim_whitespace(table.column(c).combine_chunks()) for c in columns}
            if table.num_rows == 0 or any(pc.any(pc.equal(v, "")).as_py() for v in values.values()):
                return None
            n, label = table.num_rows, values[t.label]
            x = np.stack([pc.cast(values[c], pa.float64()).to_numpy(zero_copy_only=False) for c in t.numeric], 1) \
                if t.numeric else np.zeros((n, 0))
            if t.task == "classification":
                if classes and not pc.all(pc.is_in(label, value_set=pa.array(classes))).as_py():
                    return None
                label_name, target = label, pa.nulls(n, pa.float64())
            else:
                label_name, target = pa.nulls(n, pa.string()), pc.cast(label, pa.float64())
                if not np.isfinite(target.to_numpy(zero_copy_only=False)).all():
                    return None
        except (pa.ArrowInvalid, KeyError):
            return None
        if not np.isfinite(x).all():
            return None
        cats = np.stack([values[c].to_numpy(zero_copy_only=False) for c in t.categorical], 1).ravel() \
            if t.categorical else np.zeros(0, object)
        width = len(t.categorical)
        return {"key": values[t.key], "row": pa.array(np.arange(2, n + 2)), "label_name": label_name, "target": target,
                "num": pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * len(t.numeric), pa.int32()), pa.array(x.ravel())),
                "cat": pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * width, pa.int32()), pa.array(cats, pa.string()))}

    return fast


def assign_split(df: DataFrame, data) -> DataFrame:
    return df  # the parser gave every row its split (pipelines.sources.split_by_key)


FIT_SCHEMA = "kind string, pos int, value string, n long, mean double, m2 double"


def fit_part(data) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """What one batch of staged rows gives to the fitted state (FIT_SCHEMA rows; merge_parts):
    the count, mean and sum of squared deviations of each numeric position and the values of each
    categorical position on its train rows, and the label names of all its rows."""
    t = data.table

    def part(batch: pa.RecordBatch) -> pa.RecordBatch:
        train = batch.filter(pc.equal(batch.column("split"), "train"))
        n, rows = train.num_rows, []
        if n and t.numeric:
            x = pc.list_flatten(train.column("num")).to_numpy(zero_copy_only=False).reshape(n, len(t.numeric))
            mean = x.mean(0)
            rows += [("numeric", i, None, n, float(mean[i]), float(m2)) for i, m2 in enumerate(((x - mean) ** 2).sum(0))]
        if n and t.categorical:
            cats = pc.list_flatten(train.column("cat"))
            k = len(t.categorical)
            rows += [("categorical", j, v, None, None, None) for j in range(k)
                     for v in pc.unique(cats.take(pa.array(np.arange(j, n * k, k)))).to_pylist() if v is not None]
        if t.task == "classification":
            rows += [("label", None, v, None, None, None) for v in pc.unique(batch.column("label_name")).to_pylist()
                     if v is not None]
        return pa.RecordBatch.from_pylist([dict(zip(("kind", "pos", "value", "n", "mean", "m2"), r)) for r in rows],
                                          schema=arrow_schema(FIT_SCHEMA))

    return part


def merge_parts(parts: pd.DataFrame, data) -> dict:
    """The fitted state from the fit_part rows of every batch: mean and population std of each
    numeric column (the parts' moments combined as Chan et al. do) and the sorted values of each
    categorical column, on train rows only; the classes (config, or every label name seen)."""
    t = data.table
    numeric = []
    for i, column in enumerate(t.numeric):
        part = parts[(parts["kind"] == "numeric") & (parts["pos"] == i)]
        if part.empty:
            numeric.append((column, 0.0, 1.0))
            continue
        n, means, m2 = part["n"].to_numpy(np.float64), part["mean"].to_numpy(), part["m2"].to_numpy()
        mean = float((n * means).sum() / n.sum())
        numeric.append((column, mean, float(np.sqrt((m2 + n * (means - mean) ** 2).sum() / n.sum()))))
    cats = parts[parts["kind"] == "categorical"]
    categorical = [(c, sorted(set(cats.loc[cats["pos"] == j, "value"]))) for j, c in enumerate(t.categorical)]
    classes = list(t.classes)
    if t.task == "classification" and not classes:
        classes = sorted(set(parts.loc[parts["kind"] == "label", "value"]))
    return {"numeric": numeric, "categorical": categorical, "classes": classes}


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


def base_schema(data) -> str:
    return ("key string, source string, split string, label int, label_name string, features binary"
            if data.table.task == "classification" else "key string, source string, split string, label double, features binary")


def transform(data, state: dict) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """Staged rows -> table rows (base_schema): standardized numbers and one-hot categories as one
    `features` vector per row, whole columns at a time (a row's categories are looked up per
    column with `index_in`, never row by row in Python). Prepare runs it on the staged files in
    Python (pipelines.sources.map_staged)."""
    classification = data.table.task == "classification"
    mean = np.array([m for _, m, _ in state["numeric"]], dtype=np.float64)
    std = np.array([s if s and s > 0 else 1.0 for _, _, s in state["numeric"]], dtype=np.float64)
    vocabularies = [pa.array(values, pa.string()) for _, values in state["categorical"]]
    width = len(mean) + sum(len(v) for v in vocabularies)
    classes = pa.array(state["classes"], pa.string())
    schema = arrow_schema(base_schema(data))

    def one(batch: pa.RecordBatch) -> pa.RecordBatch:
        n, k = batch.num_rows, len(vocabularies)
        x = np.zeros((n, width), dtype=np.float32)
        if len(mean):
            num = pc.list_flatten(batch.column("num")).to_numpy(zero_copy_only=False).reshape(n, len(mean))
            x[:, : len(mean)] = (num - mean) / std
        cats, offset, rows = pc.list_flatten(batch.column("cat")), len(mean), np.arange(n)
        for j, vocab in enumerate(vocabularies):  # column j of every row: values j, j + k, ...
            hit = pc.fill_null(pc.index_in(cats.take(pa.array(np.arange(j, n * k, k))), value_set=vocab), -1)
            hit = hit.to_numpy(zero_copy_only=False)
            x[rows[hit >= 0], offset + hit[hit >= 0]] = 1.0  # a value train never had: all zeros
            offset += len(vocab)
        out = {"key": batch.column("key"), "source": batch.column("source"), "split": batch.column("split")}
        if classification:
            out |= {"label": pc.index_in(batch.column("label_name"), value_set=classes).cast(pa.int32()),
                    "label_name": batch.column("label_name")}
        else:
            out["label"] = batch.column("target").cast(pa.float64())
        out["features"] = tensors.pack("features", x)  # float32 bytes per row (dlpipe.tensors)
        return pa.RecordBatch.from_pydict(out, schema=schema)

    return one


def derive(tables: dict, data, state) -> dict:
    return {}


def report(tables: dict, data, state, written: dict) -> dict:
    return {"features": len(state["numeric"]) + sum(len(v) for _, v in state["categorical"]),
            "classes": state["classes"]}
