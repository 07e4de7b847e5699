"""data.kind: ratings. (user, item, rating) rows -> <name>_train/_val/_test with
`key string (user:item), source string, user string, item string, rating float`, split by a hash
of the key (data.ratings.split_by: rating) or of the user (split_by: user: all of a user's
ratings in one split). Derived from those, rebuilt by every job:
- <name>_items `item string, index int`: the position of each item in the rating vectors
  (items in numeric order when every id is a number);
- <name>_vectors_train/_val/_test `user string, ratings array<float>`: one dense vector per
  user of the ratings in that split, 0 for unrated; _val and _test add `given array<float>`, the
  user's train ratings (zeros for a user with none): what a recommender is given to predict `ratings`;
- <name>_users `user string, index int` and <name>_item_vectors_train/_val/_test `item string,
  ratings array<float>` (_val and _test add `given`): the same matrices by item, one vector per item
  over every user, what the item-based AutoRec trains on (it is evaluated and served per user).
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
    everything = splits["train"].unionByName(splits["val"]).unionByName(splits["test"])
    (items, n_items), (users, n_users) = _index(everything, "item"), _index(everything, "user")
    out = {"items": items, "users": users}
    for key, position, prefix, index, width in (("user", "item", "vectors_", items, n_items),
                                                ("item", "user", "item_vectors_", users, n_users)):
        train = dense_vectors(splits["train"], index, width, key, position)
        out[prefix + "train"] = train
        none = F.array_repeat(F.lit(0.0).cast("float"), width)
        known = train.select(key, F.col("ratings").alias("given"))
        for split in BASE[1:]:  # what a model is given (the train ratings) beside what it must predict
            out[prefix + split] = dense_vectors(splits[split], index, width, key, position).join(known, key, "left") \
                .select(key, "ratings", F.coalesce("given", none).alias("given"))
    return out


def _index(ratings: DataFrame, column: str) -> tuple[DataFrame, int]:
    """`<column> string, index int`: every id of the column once, in numeric order when every id is a
    number; and how many ids there are."""
    ids = [r[column] for r in ratings.select(column).distinct().collect()]
    numeric = all(i.lstrip("-").isdigit() for i in ids)
    ids.sort(key=(lambda i: int(i)) if numeric else None)
    frame = pd.DataFrame({column: ids, "index": np.arange(len(ids), dtype=np.int32)})
    return ratings.sparkSession.createDataFrame(frame, f"{column} string, index int"), len(ids)


def dense_vectors(ratings: DataFrame, index: DataFrame, width: int, key: str = "user", position: str = "item") -> DataFrame:
    """(user, item, rating) rows -> `<key> string, ratings array<float>`: one vector per user (or per
    item), the rating at the item's (user's) position in `index`, 0 for unrated."""

    def dense(batches):
        for batch in batches:
            vectors = []
            for positions, values in zip(batch["positions"], batch["ratings"]):
                v = np.zeros(width, dtype=np.float32)
                v[np.asarray(positions, dtype=np.int64)] = values
                vectors.append(v)
            yield pd.DataFrame({key: batch[key], "ratings": vectors})

    grouped = ratings.join(F.broadcast(index), position).groupBy(key).agg(
        F.collect_list("index").alias("positions"), F.collect_list("rating").alias("ratings"))
    return grouped.mapInPandas(dense, f"{key} string, ratings array<float>")


def report(tables: dict, data, state, written: dict) -> dict:
    return {"items": written["items"]["rows"], "users": written["users"]["rows"], "users_per_split": {s: written[f"vectors_{s}"]["rows"] for s in BASE}}
