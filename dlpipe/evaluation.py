"""The one evaluation of a model on a pinned holdout table, used by evaluate, retrain (for the
champion and the challenger alike) and the benchmarks: the same rows (data.select_classes applied
and relabelled), the same metrics for the model's task, the same "good enough" rule."""

from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe import lake, modeling
from dlpipe.config import TASK_METRICS
from dlpipe.refs import TableRef
from dlpipe.scoring_sequence import forecast_pairs
from dlpipe.scoring import ERROR_COLUMN, confusion_and_metrics, predict, regression_metrics, roc_auc, scored_rows

METRICS = TASK_METRICS  # every metric evaluate can log, by model.task


def holdout(spark: SparkSession, model_uri: str, table: TableRef, *, task: str, label_ids: tuple[int, ...],
            num_classes: int) -> tuple[dict[str, float], DataFrame, np.ndarray | None]:
    """(metrics, predictions, confusion matrix or None) of `model_uri` on `table`.
    Classification: test_accuracy, test_log_loss and, for two classes, test_roc_auc; regression:
    test_r2, test_mse, test_mae (a forecast: over every step of the horizon); language_model:
    test_bpc (bits per token, the mean over rows); reconstruction: test_mse (mean reconstruction error); clustering:
    test_qe (mean quantization error); recommendation: test_rmse and test_mae over the held-out
    ratings, test_ratings (how many); embedding: test_loss and test_pair_accuracy of word2vec's
    objective (dlpipe.words.holdout). All: test_rows (users for a recommender)."""
    # stored tensor columns as they are: predict unpacks them in its own batches
    rows = modeling.relabel(lake.read_table(spark, table.uri, table.version, stored=True), label_ids)
    if task == "recommendation":  # rating vectors: the held-out ratings predicted from the known ones
        from dlpipe import recommend

        per_user = recommend.errors(spark, rows, model_uri)
        return recommend.holdout_metrics(per_user), per_user, None
    if task == "embedding":  # word vectors: their own objective on the held-out text
        from dlpipe import words

        return words.holdout(model_uri, table.uri, table.version), rows, None
    predictions = predict(spark, rows, model_uri)
    if task == "language_model":  # the mean over rows, as the epoch figure val_bpc
        s = scored_rows(predictions).agg(F.avg("bits_per_token").alias("bpc"), F.count("bits_per_token").alias("n")).first()
        return {"test_bpc": float(s["bpc"] or 0.0), "test_rows": int(s["n"])}, predictions, None
    if task == "regression" and "forecast" in predictions.columns:  # every step of every window's horizon
        m = regression_metrics(forecast_pairs(predictions))
        windows = scored_rows(predictions).count()
        return {"test_r2": m["r2"], "test_mse": m["mse"], "test_mae": m["mae"], "test_rows": windows}, predictions, None
    if task in ERROR_COLUMN:
        s = scored_rows(predictions).agg(F.avg(ERROR_COLUMN[task]).alias("error"), F.count("*").alias("n")).first()
        return {METRICS[task][0]: float(s["error"] or 0.0), "test_rows": int(s["n"])}, predictions, None
    if task == "regression":
        m = regression_metrics(predictions)
        return {"test_r2": m["r2"], "test_mse": m["mse"], "test_mae": m["mae"], "test_rows": m["rows"]}, predictions, None
    matrix, m = confusion_and_metrics(predictions, num_classes)
    metrics = {"test_accuracy": m["accuracy"], "test_log_loss": m["log_loss"], "test_rows": m["rows"]}
    if num_classes == 2:
        metrics["test_roc_auc"] = roc_auc(predictions)
    return metrics, predictions, matrix


def good_enough(task: str, metrics: dict[str, float], min_accuracy: float) -> tuple[bool, str]:
    """(ok, why) for a model with no champion to beat: classification needs test_accuracy >=
    registry.min_accuracy; regression needs test R^2 > 0 (better than predicting the mean); a model
    trained without a target (reconstruction, clustering, a language model, word vectors) or a recommender has no threshold."""
    if task in ERROR_COLUMN or task in ("language_model", "recommendation", "embedding"):
        return True, f"no threshold for a {task} model"
    if task == "regression":
        r2 = metrics["test_r2"]
        return r2 > 0, f"test R^2 {r2:.4f} {'>' if r2 > 0 else '<='} 0 (the mean's)"
    accuracy = metrics["test_accuracy"]
    ok = accuracy >= min_accuracy
    return ok, f"test_accuracy {accuracy:.4f} {'>=' if ok else '<'} registry.min_accuracy {min_accuracy}"


def label_view(data, task: str, model_uri: str) -> tuple[list[str], tuple[int, ...]]:
    """(class names, label ids) for `model_uri` on `data`: a recurrent model's classes come from the
    vocabulary table it was trained with, so from the model itself (its meta.json)."""
    if data.kind in ("text", "timeseries", "trees"):
        from dlpipe.tracking import logged_meta

        return list(logged_meta(model_uri).get("classes") or []), ()
    return modeling.label_view(data, task)
