"""data.kind: ratings. (user, item, rating) rows -> <name>_train/_val/_test with
`key string (user:item), source string, user string, item string, rating float`, split by a hash
of the key (data.ratings.split_by: rating) or of the user (split_by: user: all of a user's
ratings in one split). Derived from those, rebuilt by every job:
- <name>_items `item string, index int`: the position of each item in the rating vectors
  (items in numeric order when every id is a number);
- <name>_vectors_train/_val/_test `user string, ratings array<float>`: one dense vector per
  user of the ratings in that split, 0 for unrated; _val and _test add `given array<float>`, the
  user's train ratings (zeros for a user with none): what a recommender is given to predict `ratings`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines import records
from pipelines.contract import record_parser
from pipelines.sources import Parser
from pipelines.split import hash_split

BASE = ("train", "val", "test")
STATE = None
UNIT = "rows"


def parser(data, root: str, state) -> Parser:
    r = data.ratings

    def convert(record: dict) -> dict:
        user, item = records.text(record, r.user), records.text(record, r.item)
        rating = records.number(record, r.rating)
        if not r.min_rating <= rating <= r.max_rating:
            raise records.Invalid(f"column {r.rating!r}: {rating:g} is outside [{r.min_rating:g}, {r.max_rating:g}]")
        return {"key": f"{user}:{item}", "user": user, "item": item, "rating": rating}

    return record_parser(root, r.format, "utf-8", "", "user string, item string, rating float", convert)


def assign_split(df: DataFrame, data) -> DataFrame:
    return hash_split(df, data.split_fractions, "key" if data.ratings.split_by == "rating" else "user")


def to_base(accepted: DataFrame, data, state) -> DataFrame:
    return accepted.select("key", "source", "user", "item", "rating", "split")


def derive(tables: dict, data, state) -> dict:
    splits = {s: tables[s] for s in BASE}
    spark = splits["train"].sparkSession
    everything = splits["train"].unionByName(splits["val"]).unionByName(splits["test"])
    items = [r["item"] for r in everything.select("item").distinct().collect()]
    numeric = all(i.lstrip("-").isdigit() for i in items)
    items.sort(key=(lambda i: int(i)) if numeric else None)
    index = spark.createDataFrame(pd.DataFrame({"item": items, "index": np.arange(len(items), dtype=np.int32)}),
                                  "item string, index int")
    out = {"items": index, "vectors_train": dense_vectors(splits["train"], index, len(items))}
    known = out["vectors_train"].select("user", F.col("ratings").alias("given"))
    none = F.array_repeat(F.lit(0.0).cast("float"), len(items))
    for split in ("val", "test"):  # what a model is given (the train ratings) beside what it must predict
        out[f"vectors_{split}"] = dense_vectors(splits[split], index, len(items)).join(known, "user", "left") \
            .select("user", "ratings", F.coalesce("given", none).alias("given"))
    return out


def dense_vectors(ratings: DataFrame, index: DataFrame, width: int) -> DataFrame:
    """(user, item, rating) rows -> `user string, ratings array<float>`: one vector per user, the
    rating at the item's position in `index`, 0 for unrated."""

    def dense(batches):
        for batch in batches:
            vectors = []
            for positions, values in zip(batch["positions"], batch["ratings"]):
                v = np.zeros(width, dtype=np.float32)
                v[np.asarray(positions, dtype=np.int64)] = values
                vectors.append(v)
            yield pd.DataFrame({"user": batch["user"], "ratings": vectors})

    grouped = ratings.join(F.broadcast(index), "item").groupBy("user").agg(
        F.collect_list("index").alias("positions"), F.collect_list("rating").alias("ratings"))
    return grouped.mapInPandas(dense, "user string, ratings array<float>")


def report(tables: dict, data, state, written: dict) -> dict:
    return {"items": written["items"]["rows"], "users_per_split": {s: written[f"vectors_{s}"]["rows"] for s in BASE}}
