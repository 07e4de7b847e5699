"""Batch inference with an MLflow pyfunc model: whole Arrow batches, the model loaded once per
executor Python process."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe import tensors

# rows the model cannot take (wrong length, NaN or infinite, out of range) are kept: no prediction, the reason
PREDICTION_SCHEMA = ("key string, label int, prediction long, label_name string, probabilities array<float>, "
                     "rejected_reason string")
REGRESSION_SCHEMA = "key string, label double, prediction double, rejected_reason string"
# the models trained without a target: their pyfunc's columns, and the one that says how badly a row fits
UNSUPERVISED_COLUMNS = {"reconstruction": "code array<float>, reconstruction_error double",
                        "clustering": "bmu long, bmu_row long, bmu_col long, quantization_error double"}
ERROR_COLUMN = {"reconstruction": "reconstruction_error", "clustering": "quantization_error"}
_LOADED: dict[str, object] = {}  # per executor process: model directory -> loaded pyfunc model


def ship_model(spark: SparkSession, model_uri: str) -> str:
    """Download the model once on the driver and ship it to executors with SparkContext.addFile;
    returns the name executors look it up by (SparkFiles.get)."""
    import mlflow

    name = f"dlpipe-model-{uuid.uuid4().hex[:12]}"
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(Path(tempfile.mkdtemp(prefix="dlpipe-")) / name))
    spark.sparkContext.addFile(local, recursive=True)
    return Path(local).name


def model_meta(shipped: str) -> dict:
    """The logged model's meta.json (input shape, classes, task, input column), on the driver."""
    from pyspark import SparkFiles

    return json.loads(Path(SparkFiles.get(shipped), "artifacts", "meta.json").read_text())


def predict(spark: SparkSession, images: DataFrame, model_uri: str) -> DataFrame:
    """Classification: key, label, prediction, label_name, probabilities, rejected_reason for every
    row of an image or feature table; regression: key, label, prediction (doubles), rejected_reason;
    reconstruction and clustering: key, label (a double), the pyfunc's columns, rejected_reason.
    Recurrent models (raw text or history windows in): dlpipe.scoring_sequence.
    Arrow batches go straight to the model as one float32 matrix (no per-row Python objects). A row
    the model cannot take keeps its key and label, no prediction, and the reason (rejected_reason,
    null for scored rows), with the expected shape and range."""
    shipped = ship_model(spark, model_uri)
    meta = model_meta(shipped)
    if meta.get("task") == "recommendation":
        from dlpipe.errors import DlpipeError

        raise DlpipeError(f"{model_uri} is a recommender: it scores rating vectors, with `dlpipe recommend` "
                          "(top-k unrated items per user) or `dlpipe evaluate` (held-out ratings)")
    if meta.get("task") == "embedding":
        from dlpipe.errors import DlpipeError

        raise DlpipeError(f"{model_uri} is a word2vec model: it maps words to vectors, with `dlpipe embed` (every "
                          "word into <name>_embeddings), `dlpipe words` or its pyfunc (a `word` column)")
    column = meta.get("input_column", "pixels")
    if column in ("text", "history", "tree"):  # a recurrent model (raw text or a window in) or an RNTN (a tree)
        from dlpipe import scoring_sequence

        return scoring_sequence.predict(images, shipped, meta)
    regression = meta.get("task") == "regression"
    unsupervised = UNSUPERVISED_COLUMNS.get(meta.get("task"))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model = _load(shipped)
        for batch in batches:
            x, reasons = _checked(model, tensors.unpack(batch.column(column), column))  # stored bytes or lists
            good = np.array([r is None for r in reasons], dtype=bool)
            out = model.predict(None, x[good])
            columns = {"key": batch.column("key"), "label": batch.column("label")}
            if unsupervised:
                columns |= {name: _spread(pa.array(list(out[name]) if out[name].dtype == object else out[name].to_numpy()), good)
                            for name in out.columns}
            elif regression:
                columns["prediction"] = _spread(pa.array(out["prediction"].to_numpy(np.float64)), good)
            else:
                probs = np.stack(out["probabilities"].to_numpy()).astype(np.float32) if len(out) else \
                    np.zeros((0, len(meta["classes"])), np.float32)
                columns |= {"prediction": _spread(pa.array(out["prediction"].to_numpy(np.int64)), good),
                            "label_name": _spread(pa.array(out["label_name"].astype(object).to_numpy(), pa.string()), good),
                            "probabilities": _spread(pa.FixedSizeListArray.from_arrays(
                                pa.array(probs.ravel(), pa.float32()), probs.shape[1]).cast(pa.list_(pa.float32())), good)}
            columns["rejected_reason"] = pa.array(reasons, pa.string())
            yield pa.RecordBatch.from_pydict(columns)

    label = F.col("label").cast("double") if regression or unsupervised else F.col("label")
    schema = (f"key string, label double, {unsupervised}, rejected_reason string" if unsupervised
              else REGRESSION_SCHEMA if regression else PREDICTION_SCHEMA)
    return images.select("key", label.alias("label"), column).mapInArrow(run, schema)


def _checked(model, values: pa.Array) -> tuple[np.ndarray, list[str | None]]:
    """(rows x width float32 matrix, per-row reason or None) of a list<float> column: rows of the
    wrong length (or null) become zeros and carry a reason, as do rows the model's own
    row_problems rejects (NaN, infinite, out of range)."""
    width = model.width
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)  # NaN for a null row
    right = np.nan_to_num(lengths, nan=-1).astype(np.int64) == width
    if right.all():
        x = np.array(pc.list_flatten(values).to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(values), width)
    else:  # rare: the rows of the right length only, the others stay zero
        x = np.zeros((len(values), width), np.float32)
        taken = values.filter(pa.array(right))
        if len(taken):
            x[right] = np.asarray(pc.list_flatten(taken).to_numpy(zero_copy_only=False), np.float32).reshape(-1, width)
    reasons = list(model.row_problems(x))
    for i in np.flatnonzero(~right):
        reasons[i] = model.length_problem(None if np.isnan(lengths[i]) else int(lengths[i]))
    return x, [None if r is None else f"{r}; expected {model.expected()}" for r in reasons]


def _spread(scored: pa.Array, good: np.ndarray) -> pa.Array:
    """The scored rows' values at their positions, null at the rejected rows."""
    if good.all():
        return scored
    positions = np.full(len(good), -1, np.int64)
    positions[good] = np.arange(int(good.sum()))
    return scored.take(pa.array(positions, mask=~good))


def _load(shipped: str):
    """The model's Python object (pyfunc's own predict, without per-call schema enforcement), once
    per executor process."""
    from pyspark import SparkFiles

    path = SparkFiles.get(shipped)
    if path not in _LOADED:
        import mlflow.pyfunc

        _LOADED[path] = with_input_checks(mlflow.pyfunc.load_model(path).unwrap_python_model())
    return _LOADED[path]


def with_input_checks(model):
    """A model registered before the input checks carries the pyfunc code of its day (MLflow
    stores it with the model): give it this version's checks and predict, around the same
    network, so that scoring an older champion keeps its rows with a reason instead of failing."""
    if hasattr(model, "row_problems"):
        return model
    from dlpipe.pyfunc_model import TorchModel

    checked = TorchModel.__new__(TorchModel)
    checked.__dict__.update(vars(model))
    checked.width = int(np.prod(model.input_shape))
    checked.value_range = [0.0, 1.0] if getattr(model, "column", "pixels") == "pixels" else None
    return checked


def scored_rows(predictions: DataFrame) -> DataFrame:
    """The rows the model took (rejected_reason is null)."""
    if "rejected_reason" not in predictions.columns:
        return predictions
    return predictions.where(F.col("rejected_reason").isNull())


def confusion_and_metrics(predictions: DataFrame, num_classes: int) -> tuple[np.ndarray, dict[str, float]]:
    """Confusion matrix, accuracy and mean log loss of the scored rows, aggregated by Spark (only
    counts reach the driver)."""
    predictions = scored_rows(predictions)
    p_true = F.element_at("probabilities", F.col("label") + 1)
    stats = predictions.agg(
        F.count("*").alias("n"),
        F.avg((F.col("prediction") == F.col("label")).cast("double")).alias("accuracy"),
        F.avg(-F.log(F.greatest(p_true, F.lit(1e-12)))).alias("log_loss"),
    ).first()
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for row in predictions.groupBy("label", "prediction").count().collect():
        matrix[row["label"], row["prediction"]] = row["count"]
    return matrix, {"accuracy": float(stats["accuracy"] or 0.0), "log_loss": float(stats["log_loss"] or 0.0), "rows": int(stats["n"])}


def regression_metrics(predictions: DataFrame) -> dict[str, float]:
    """Mean squared and absolute error and R^2 of the scored rows, aggregated by Spark."""
    predictions = scored_rows(predictions)
    err = F.col("prediction") - F.col("label")
    s = predictions.agg(F.count("*").alias("n"), F.avg(err * err).alias("mse"), F.avg(F.abs(err)).alias("mae"),
                        F.var_pop("label").alias("var")).first()
    mse, var = float(s["mse"] or 0.0), float(s["var"] or 0.0)
    return {"mse": mse, "mae": float(s["mae"] or 0.0), "r2": 1.0 - mse / var if var > 0 else 0.0, "rows": int(s["n"])}


def roc_auc(predictions: DataFrame) -> float:
    """Binary ROC AUC of the class-1 probability (Mann-Whitney rank statistic), on the driver:
    one double and one label per row."""
    predictions = scored_rows(predictions)
    pdf = predictions.select("label", F.element_at("probabilities", 2).alias("p")).toPandas()
    return binary_auc(pdf["label"].to_numpy(), pdf["p"].to_numpy())


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    positive = np.asarray(labels) == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
