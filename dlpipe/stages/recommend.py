"""`dlpipe recommend`: the top-k items a recommender (models:/<name>@champion by default) predicts
each user would rate highest among those they have not rated. A user's known ratings are every
rating they gave in the newest <name>_train/_val/_test tables, placed by the model's own item
order (items prepared after the model was trained are left out and counted). With --user: that
user's list in the summary; without: every user's, one commit replacing <name>_recommendations
(`user, rank, item, predicted, rejected_reason`; the versions before stay readable)."""

from __future__ import annotations

import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dlpipe import lake, modeling, recommend, tracking
from dlpipe.config import MlflowConfig
from dlpipe.errors import DlpipeError, InputNotFound
from dlpipe.refs import SPLITS, resolve
from pipelines.ratings import dense_vectors


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def run(spark: SparkSession, mlflow_cfg: MlflowConfig, *, model_uri: str, ratings_uris: dict[str, str], out_uri: str,
        user: str = "", k: int = 10) -> dict:
    if k <= 0:
        raise DlpipeError(f"--k: expected a positive number of items, got {k}")
    tracking.setup(mlflow_cfg)
    resolved = modeling.resolve(model_uri)
    items = tracking.logged_meta(resolved).get("items")
    if not items:
        raise DlpipeError(f"{model_uri} is not a recommender (its model names no items): expected a model trained "
                          "with model.task=recommendation")
    tables = {s: resolve("", uri) for s, uri in ratings_uris.items()}
    ratings = None
    for s in SPLITS:
        part = lake.read_table(spark, tables[s].uri, tables[s].version).select("user", "item", "rating")
        ratings = part if ratings is None else ratings.unionByName(part)
    if user:
        ratings = ratings.where(F.col("user") == user)
    index = spark.createDataFrame(pd.DataFrame({"item": items, "index": range(len(items))}), "item string, index int")
    unknown = ratings.join(F.broadcast(index), "item", "left_anti").count()
    if unknown:
        say(f"{unknown} ratings of items the model was not trained with are left out")
    known = dense_vectors(ratings, index, len(items))
    top = recommend.top_k(spark, known, resolved, k)
    inputs = {s: ref.to_dict() for s, ref in tables.items()}
    summary = {"step": "recommend", "model_uri": resolved, "k": k, "ratings_tables": inputs,
               "ratings_of_unknown_items": unknown}
    if user:
        rows = top.orderBy("rank").collect()
        if not rows:
            raise InputNotFound(f"user {user!r} has no ratings in {', '.join(str(t) for t in tables.values())}")
        if rows[0]["rejected_reason"]:
            raise DlpipeError(f"user {user!r}: the model cannot score their ratings: {rows[0]['rejected_reason']}")
        return summary | {"user": user, "recommendations": [
            {"rank": r["rank"], "item": r["item"], "predicted": round(float(r["predicted"]), 4)} for r in rows]}
    metadata = {"dlpipe.step": "recommend", "dlpipe.model_uri": resolved,
                **{f"dlpipe.table.{s}": str(ref) for s, ref in tables.items()}}
    version = lake.write_table(top, out_uri, mode="overwrite", metadata=metadata)
    written = lake.read_table(spark, out_uri, version)
    counts = written.agg(F.countDistinct("user").alias("users"), F.count("*").alias("rows"),
                         F.count("rejected_reason").alias("rejected")).first()
    say(f"wrote {out_uri} version {version}: top {k} items of {counts['users']} users")
    return summary | {"table": {"uri": out_uri, "version": version}, "users": int(counts["users"]),
                      "rows": int(counts["rows"]), "rejected_users": int(counts["rejected"])}
