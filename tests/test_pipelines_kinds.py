"""Ratings, text and time-series kinds end to end on small real samples (MovieLens 100k, the
women's clothing reviews, yearly sunspots), each landing zone with planted bad inputs."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dlpipe import datasets
from pipelines.records import read_records
from pipelines.text import tokenize
from pipelines.timeseries import windows
from dlpipe.refs import SPLITS
from tests.conftest import make_config, read_table, split_rows, stage


def test_movielens_ratings_and_user_vectors(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    ratings = datasets.movielens100k().iloc[:400]
    datasets.write_shards(ratings, landing, 2, "parquet")
    first = ratings.iloc[0]
    planted = pd.DataFrame({"user_id": [first.user_id, 7, 8], "movie_id": [first.movie_id, 50, 51],
                            "rating": ["4", "five", "9"], "timestamp": [0, 0, 0]})
    planted.to_parquet(landing / "z-planted.parquet")  # rating as text: "4" reads, "five" does not
    (landing / "z-broken.parquet").write_bytes(b"PAR1 not really")
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.ratings.split_by=user",
                      "data.max_rejected_fraction=0.02", conf="conf/movielens.yaml")

    summary = stage("prepare", spark, cfg)

    assert summary["input_rows"] == 400 + 3 + 1 == summary["accepted"] + summary["rejected"]
    assert summary["rejected"] == 4
    rejected = read_table(summary, "rejected")
    reasons = dict(zip(rejected["key"], rejected["reason"]))
    assert reasons[f"{first.user_id}:{first.movie_id}"].startswith(f"duplicate key {first.user_id}:{first.movie_id} (first seen in ")
    assert reasons["z-planted.parquet:2"] == "row 2: column 'rating': expected a number, got 'five'"
    assert reasons["z-planted.parquet:3"] == "row 3: column 'rating': 9 is outside [1, 5]"
    assert reasons["z-broken.parquet"].startswith("cannot read Parquet")

    rows = split_rows(summary)
    assert len(rows) == 400 and rows["key"].is_unique
    assert rows.groupby("user")["split"].nunique().max() == 1  # split_by: user
    items = read_table(summary, "items")
    assert list(items["item"]) == [str(i) for i in sorted(ratings["movie_id"].unique())]
    position = dict(zip(items["item"], items["index"]))
    for split in SPLITS:
        vectors = read_table(summary, f"vectors_{split}").set_index("user")
        part = rows[rows["split"] == split]
        assert set(vectors.index) == set(part["user"])
        for r in part.head(20).itertuples():
            assert vectors.loc[r.user, "ratings"][position[r.item]] == r.rating
        assert sum((v > 0).sum() for v in vectors["ratings"]) == len(part)  # 0 for unrated


def test_reviews_text_vocabulary_and_sequences(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    reviews = datasets.womens_reviews().iloc[:300]
    datasets.write_shards(reviews, landing, 2, "jsonl")
    real_empty = int(reviews["review_text"].isna().sum())
    (landing / "z-planted.jsonl").write_text(
        json.dumps({"id": 90_000, "review_text": "   ", "rating": 5}) + "\n"
        + json.dumps({"id": 90_001, "review_text": "?!", "rating": 5}) + "\n"
        + '{"id": 90002, "review_text": "unterminated\n')
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.text.max_length=24",
                      "data.max_rejected_fraction=0.1", conf="conf/reviews.yaml")

    summary = stage("prepare", spark, cfg)

    assert summary["input_rows"] == 303 == summary["accepted"] + summary["rejected"]
    assert summary["rejected"] == real_empty + 3
    reasons = read_table(summary, "rejected").set_index("key")["reason"]
    assert reasons["90000"] == "line 1: empty text in column 'review_text'"
    assert reasons["90001"].startswith("line 2: empty text in column 'review_text': no word tokens")
    assert reasons["z-planted.jsonl:3"].startswith("line 3: not valid JSON")
    assert sum(r.endswith("empty text in column 'review_text'") for r in reasons) == real_empty + 1

    rows = split_rows(summary)
    vocab = read_table(summary, "vocab")
    tokens = vocab[vocab["kind"] == "token"].set_index("token")
    assert list(tokens.index[:2]) == ["<pad>", "<unk>"] and list(tokens["id"]) == list(range(len(tokens)))
    train_counts = pd.Series([t for ts in rows.loc[rows["split"] == "train", "tokens"] for t in ts]).value_counts()
    words = tokens.iloc[2:]
    assert (train_counts[words.index] == words["count"]).all() and (words["count"] >= 2).all()  # train only
    assert set(train_counts[train_counts >= 2].index) == set(words.index)
    for r in rows.head(30).itertuples():
        assert list(r.tokens) == tokenize(r.text, True) and r.length == len(r.tokens)
        expected = [int(tokens["id"].get(t, 1)) for t in r.tokens[:24]]
        assert list(r.ids) == expected + [0] * (24 - len(expected))
        assert r.label_name == str(reviews.set_index("id").loc[int(r.key), "rating"]) and r.label == int(r.label_name) - 1
    lengths = rows["length"]
    assert summary["length"]["max"] == lengths.max() and summary["length"]["min"] == lengths.min()
    assert summary["length"]["truncated_fraction"] == (lengths > 24).mean()


def test_sunspots_windows_split_by_time_as_data_arrives(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    sun = datasets.sunspots()
    datasets.write_shards(sun.iloc[:250], landing, 2, "csv")  # 1700-1949
    (landing / "z-planted.csv").write_text("year,sunactivity\n17x5,3.0\n1750,83.4\n1751,not-a-number\n")
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.mode=append",
                      "data.max_rejected_fraction=0.02", conf="conf/sunspots.yaml")

    first = stage("prepare", spark, cfg)

    assert (first["input_rows"], first["accepted"], first["rejected"]) == (253, 250, 3)
    reasons = read_table(first, "rejected").set_index("row")["reason"]
    assert reasons[2] == "line 2: column 'year': expected a number or a timestamp, got '17x5'"
    assert reasons[3].startswith("duplicate key @1750.0 (first seen in ")
    assert reasons[4] == "line 4: column 'sunactivity': expected a number, got 'not-a-number'"
    windows_1 = {s: read_table(first, s) for s in SPLITS}
    assert len(windows_1["test"]) == 0  # no data from 1960 on yet

    datasets.write_shards(sun.iloc[250:], landing, 1, "csv", prefix="later")  # 1950-2008 arrives
    second = stage("prepare", spark, cfg)
    assert second["input_files"] == 1 and second["accepted"] == 59
    assert read_table(second, "observations")["key"].is_unique and len(read_table(second, "observations")) == 309
    w = {s: read_table(second, s) for s in SPLITS}
    assert w["train"]["end"].max() < w["val"]["start"].min()  # no future leaks into training
    assert w["val"]["end"].max() < w["test"]["start"].min()
    assert w["train"]["end"].max() < 1900 <= w["val"]["start"].min() and w["test"]["start"].min() >= 1960
    assert set(w["train"]["key"]) == set(windows_1["train"]["key"])  # earlier windows stay where they were
    values = sun.set_index("year")["sunactivity"]
    row = w["val"].iloc[0]
    assert np.allclose(row["history"], values.loc[row["start"]: row["start"] + 19])
    assert np.allclose(row["target"], [values.loc[row["end"]]])
    assert (len(w["train"]), len(w["val"]), len(w["test"])) == (180, 40, 29)


def test_windows_skip_gaps_and_straddling():
    obs = pd.DataFrame({"series": "", "time": [1.0, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12], "value": np.arange(11.0)})
    out = windows(obs, history=2, horizon=1, stride=1, val_start=10.0, test_start=13.0)
    # 4 and 5 span the gap 5 -> 7; 8 and 9 straddle val_start
    assert list(zip(out["start"], out["split"])) == [(1.0, "train"), (2.0, "train"), (3.0, "train"), (7.0, "train"), (10.0, "val")]
    assert list(out.loc[3, "history"]) == [5.0, 6.0] and list(out.loc[3, "target"]) == [7.0]  # times 7, 8 -> 9


def test_read_records_reports_lines():
    content = b"a,b\n1,2\n3\n\n5,6\n"
    assert list(read_records(content, "csv")) == [(2, {"a": "1", "b": "2"}, None), (3, None, "line 3: expected 2 fields, got 1"),
                                                  (5, {"a": "5", "b": "6"}, None)]
    assert list(read_records(b"one\n\ntwo \xff\n", "lines")) == [(1, {"text": "one"}, None),
                                                                (3, None, "line 3: not valid utf-8: invalid start byte")]
    assert list(read_records(b"", "jsonl")) == [(None, None, "empty file")]
    table = pa.table({"x": [1, 2]})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    assert [r for r, _, _ in read_records(buffer.getvalue().to_pybytes(), "parquet")] == [1, 2]
