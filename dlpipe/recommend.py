"""Scoring rating vectors with a recommender's pyfunc in Spark (whole Arrow batches, the model
loaded once per executor process, as dlpipe.scoring): held-out errors for evaluate, and the top-k
unrated items per user for `dlpipe recommend`. A vector the model cannot take (wrong length, a
NaN, a rating above the scale) is kept with its reason, never scored."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe.scoring import _checked, _load, ship_model

ERRORS_SCHEMA = "user string, rated long, squared_error double, absolute_error double, rejected_reason string"
TOP_SCHEMA = "user string, rank int, item string, predicted float, rejected_reason string"


def errors(spark: SparkSession, vectors: DataFrame, model_uri: str) -> DataFrame:
    """Per user of a `_vectors_val/_test` table: the ratings held out (`ratings`), and the squared
    and absolute errors of the model's predictions of them from the user's known ones (`given`)."""
    shipped = ship_model(spark, model_uri)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model = _load(shipped)
        for batch in batches:
            x, reasons = _checked(model, batch.column("given"))
            target, _ = _checked(model, batch.column("ratings"))
            predicted, good = _predicted(model, x, batch.column("user").to_pylist(), reasons)
            rated = (target > 0) & good[:, None]
            diff = np.where(rated, predicted - target, 0.0)
            yield pa.RecordBatch.from_pydict({
                "user": batch.column("user"), "rated": pa.array(rated.sum(1), pa.int64()),
                "squared_error": pa.array((diff ** 2).sum(1), pa.float64()),
                "absolute_error": pa.array(np.abs(diff).sum(1), pa.float64()),
                "rejected_reason": pa.array(reasons, pa.string())})

    return vectors.select("user", "given", "ratings").mapInArrow(run, ERRORS_SCHEMA)


def _predicted(model, x: np.ndarray, users: list[str], reasons: list) -> tuple[np.ndarray, np.ndarray]:
    """(predicted ratings, which rows were scored) for the rows of x without a reason; an item-based
    model (model.users) also rejects, in `reasons`, the users outside its training matrix."""
    if getattr(model, "users", None):
        for i, problem in enumerate(model.user_problems(users)):
            reasons[i] = reasons[i] or problem
    good = np.array([r is None for r in reasons], dtype=bool)
    predicted = np.zeros_like(x)
    if good.any():
        rows = pd.DataFrame({"user": [u for u, g in zip(users, good) if g], "ratings": list(x[good])}) \
            if getattr(model, "users", None) else x[good]
        predicted[good] = np.stack(model.predict(None, rows)["predicted"].to_numpy())
    return predicted, good


def holdout_metrics(per_user: DataFrame) -> dict[str, float]:
    """test_rmse and test_mae over every held-out rating of the scored users; test_rows: those users."""
    s = per_user.where(F.col("rejected_reason").isNull()).agg(
        F.sum("rated").alias("n"), F.sum("squared_error").alias("se"), F.sum("absolute_error").alias("ae"),
        F.count("*").alias("users")).first()
    n = int(s["n"] or 0)
    if n == 0:
        raise ValueError("no held-out rating to evaluate the recommender on (every test vector is empty or rejected)")
    return {"test_rmse": math.sqrt(s["se"] / n), "test_mae": s["ae"] / n, "test_rows": int(s["users"]),
            "test_ratings": n}


def top_k(spark: SparkSession, known: DataFrame, model_uri: str, k: int) -> DataFrame:
    """`user, rank, item, predicted, rejected_reason`: for each user of `known` (user, ratings: every
    rating they gave), the k unrated items with the highest predicted rating, rank 1 first; a user
    whose vector the model rejects keeps one row with the reason."""
    shipped = ship_model(spark, model_uri)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model = _load(shipped)
        for batch in batches:
            x, reasons = _checked(model, batch.column("ratings"))
            users = batch.column("user").to_pylist()
            predicted, good = _predicted(model, x, users, reasons)
            out = {"user": [], "rank": [], "item": [], "predicted": [], "rejected_reason": []}
            for i, user in enumerate(users):
                if not good[i]:
                    for name, value in zip(out, (user, None, None, None, reasons[i])):
                        out[name].append(value)
                    continue
                order = np.argsort(-np.where(x[i] > 0, -np.inf, predicted[i]), kind="stable")[: min(k, int((x[i] == 0).sum()))]
                for rank, j in enumerate(order, 1):
                    for name, value in zip(out, (user, rank, model.items[j], float(predicted[i, j]), None)):
                        out[name].append(value)
            yield pa.RecordBatch.from_pydict(out, schema=pa.schema([
                ("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()), ("predicted", pa.float32()),
                ("rejected_reason", pa.string())]))

    return known.select("user", "ratings").mapInArrow(run, TOP_SCHEMA)
