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

PREDICTION_SCHEMA = "key string, label int, prediction long, label_name string, probabilities array<float>"
REGRESSION_SCHEMA = "key string, label double, prediction double"
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
    """Classification: key, label, prediction, label_name, probabilities for every row of an image
    or feature table; regression: key, label, prediction (doubles). Arrow batches go straight to
    the model as one float32 matrix (no per-row Python objects)."""
    shipped = ship_model(spark, model_uri)
    meta = model_meta(shipped)
    column = meta.get("input_column", "pixels")
    regression = meta.get("task") == "regression"

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model = _load(shipped)
        for batch in batches:
            out = model.predict(None, _matrix(batch.column(column)))
            columns = {"key": batch.column("key"), "label": batch.column("label")}
            if regression:
                columns["prediction"] = pa.array(out["prediction"].to_numpy(np.float64))
            else:
                probs = np.stack(out["probabilities"].to_numpy()).astype(np.float32) if len(out) else \
                    np.zeros((0, len(meta["classes"])), np.float32)
                columns |= {"prediction": pa.array(out["prediction"].to_numpy(np.int64)),
                            "label_name": pa.array(out["label_name"].to_numpy(), pa.string()),
                            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), probs.shape[1])
                            .cast(pa.list_(pa.float32()))}
            yield pa.RecordBatch.from_pydict(columns)

    label = F.col("label").cast("double") if regression else F.col("label")
    return images.select("key", label.alias("label"), column).mapInArrow(
        run, REGRESSION_SCHEMA if regression else PREDICTION_SCHEMA)


def _matrix(values: pa.Array) -> np.ndarray:
    """A list<float> column (no nulls: prepare rejects those rows) as a rows x width float32 matrix."""
    flat = np.array(pc.list_flatten(values).to_numpy(zero_copy_only=False), dtype=np.float32)  # writable, for torch
    return flat.reshape(len(values), -1) if len(values) else flat.reshape(0, 0)


def _load(shipped: str):
    """The model's Python object (pyfunc's own predict, without per-call schema enforcement), once
    per executor process."""
    from pyspark import SparkFiles

    path = SparkFiles.get(shipped)
    if path not in _LOADED:
        import mlflow.pyfunc

        _LOADED[path] = mlflow.pyfunc.load_model(path).unwrap_python_model()
    return _LOADED[path]


def confusion_and_metrics(predictions: DataFrame, num_classes: int) -> tuple[np.ndarray, dict[str, float]]:
    """Confusion matrix, accuracy and mean log loss, aggregated by Spark (only counts reach the driver)."""
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
    """Mean squared and absolute error and R^2, aggregated by Spark."""
    err = F.col("prediction") - F.col("label")
    s = predictions.agg(F.count("*").alias("n"), F.avg(err * err).alias("mse"), F.avg(F.abs(err)).alias("mae"),
                        F.var_pop("label").alias("var")).first()
    mse, var = float(s["mse"] or 0.0), float(s["var"] or 0.0)
    return {"mse": mse, "mae": float(s["mae"] or 0.0), "r2": 1.0 - mse / var if var > 0 else 0.0, "rows": int(s["n"])}


def roc_auc(predictions: DataFrame) -> float:
    """Binary ROC AUC of the class-1 probability (Mann-Whitney rank statistic), on the driver:
    one double and one label per row."""
    pdf = predictions.select("label", F.element_at("probabilities", 2).alias("p")).toPandas()
    return binary_auc(pdf["label"].to_numpy(), pdf["p"].to_numpy())


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    positive = np.asarray(labels) == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
