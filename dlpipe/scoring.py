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
    or feature table; regression: key, label, prediction (doubles)."""
    shipped = ship_model(spark, model_uri)
    meta = model_meta(shipped)
    column = meta.get("input_column", "pixels")
    if meta.get("task") == "regression":
        def regress(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            model = _load(shipped)
            for batch in batches:
                out = model.predict(batch[[column]])
                yield pd.DataFrame({"key": batch["key"].to_numpy(), "label": batch["label"].to_numpy(np.float64),
                                    "prediction": out["prediction"].to_numpy(np.float64)})

        return images.select("key", F.col("label").cast("double"), column).mapInPandas(regress, REGRESSION_SCHEMA)

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = _load(shipped)
        for batch in batches:
            out = model.predict(batch[[column]])
            yield pd.DataFrame(
                {
                    "key": batch["key"].to_numpy(),
                    "label": batch["label"].to_numpy(),
                    "prediction": out["prediction"].to_numpy(np.int64),
                    "label_name": out["label_name"].to_numpy(),
                    "probabilities": out["probabilities"].to_numpy(),
                }
            )

    return images.select("key", "label", column).mapInPandas(run, PREDICTION_SCHEMA)


def _load(shipped: str):
    from pyspark import SparkFiles

    path = SparkFiles.get(shipped)
    if path not in _LOADED:
        import mlflow.pyfunc

        _LOADED[path] = mlflow.pyfunc.load_model(path)
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
