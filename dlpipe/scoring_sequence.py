"""Batch inference with a recurrent model's pyfunc (dlpipe/pyfunc_sequence.py) on a text table (its
raw `text` column: the model tokenizes as prepare did), a tree table (`tree`, an RNTN) or a
time-series windows table (`history`).
Rows the model cannot take keep their key, no prediction and the reason, as in dlpipe.scoring.

Output by task: classification as every classifier (key, label, prediction, label_name,
probabilities); regression (a forecast): key, end, target, forecast (the next `horizon` values);
language_model: key, bits_per_token (null for a row of one token, with the reason: nothing to predict)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

SCHEMAS = {
    "classification": "key string, label int, prediction long, label_name string, probabilities array<float>, "
                      "rejected_reason string",
    "regression": "key string, end double, target array<double>, forecast array<double>, rejected_reason string",
    "language_model": "key string, bits_per_token double, rejected_reason string",
}
ONE_TOKEN = "one token: a language model scores the tokens after the first"
COLUMNS = {"classification": ("key", "label", "text"), "regression": ("key", "end", "target", "history"),
           "language_model": ("key", "text")}


def predict(rows: DataFrame, shipped: str, meta: dict) -> DataFrame:
    """`shipped`: the model's name for SparkFiles (dlpipe.scoring.ship_model); `meta` its meta.json."""
    from dlpipe.scoring import _load, _spread

    task, column = meta["task"], meta["input_column"]
    if column not in rows.columns:
        raise ValueError(f"the table has no column {column!r} (columns: {rows.columns}): this {task} model reads "
                         f"{ {'text': 'raw text', 'tree': 'bracketed trees'}.get(column, 'history windows')}")

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model = _load(shipped)
        for batch in batches:
            values = batch.column(column).to_pylist()
            reasons = [None if r is None else f"{r}; expected {model.expected()}" for r in model.row_problems(values)]
            good = np.array([r is None for r in reasons], dtype=bool)
            taken = [v for v, ok in zip(values, good) if ok]
            out = model.predict(None, taken) if taken else None
            columns = {"key": batch.column("key")}
            if task == "classification":
                probs = np.stack(out["probabilities"].to_numpy()).astype(np.float32) if taken else \
                    np.zeros((0, len(meta["classes"])), np.float32)
                columns |= {"label": batch.column("label"),
                            "prediction": _spread(pa.array(out["prediction"].to_numpy(np.int64) if taken else [], pa.int64()), good),
                            "label_name": _spread(pa.array(list(out["label_name"]) if taken else [], pa.string()), good),
                            "probabilities": _spread(pa.array([p.tolist() for p in probs], pa.list_(pa.float32())), good)}
            elif task == "regression":
                columns |= {"end": batch.column("end"), "target": batch.column("target").cast(pa.list_(pa.float64())),
                            "forecast": _spread(pa.array([list(map(float, f)) for f in out["forecast"]] if taken else [],
                                                         pa.list_(pa.float64())), good)}
            else:
                bits = [None if math.isnan(b) else float(b) for b in out["bits_per_token"]] if taken else []
                columns["bits_per_token"] = _spread(pa.array(bits, pa.float64()), good)
                scored = iter(bits)
                reasons = [r if not ok or next(scored) is not None else ONE_TOKEN for r, ok in zip(reasons, good)]
            columns["rejected_reason"] = pa.array(reasons, pa.string())
            yield pa.RecordBatch.from_pydict(columns)

    return rows.select(*[column if c == "text" else c for c in COLUMNS[task]]).mapInArrow(run, SCHEMAS[task])


def forecast_pairs(predictions: DataFrame) -> DataFrame:
    """One row (prediction, label) per forecast step of every scored window: the regression metrics
    of a forecast pool all `horizon` steps."""
    steps = predictions.where(F.col("rejected_reason").isNull()).select(
        F.posexplode("forecast").alias("step", "prediction"), "target")
    return steps.select("prediction", F.element_at("target", F.col("step") + 1).alias("label"))
