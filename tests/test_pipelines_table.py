"""The table kind end to end on real samples (wine as JSON lines, UCI Adult as CSV): planted bad
rows reconcile with their reasons, statistics come from the train split only, append is
idempotent, merge upserts."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from dlpipe import datasets, lake
from dlpipe.refs import SPLITS
from tests.conftest import make_config, read_table, split_rows, stage


def test_wine_with_planted_bad_rows(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    wine = datasets.wine()
    datasets.write_shards(wine, landing, 2, "jsonl")
    good = {k: (v.item() if hasattr(v, "item") else v) for k, v in wine.iloc[0].to_dict().items()}
    planted = [
        json.dumps(good | {"id": 1000, "alcohol": "abc"}),  # line 1: wrong type
        '{"id": 1001, "alcohol": 13.2, "malic',  # line 2: unparsable
        json.dumps(good | {"id": 5}),  # line 3: a key already in part-00000.jsonl
        json.dumps(good | {"id": 1002, "cultivar": "class_9"}),  # line 4: unknown label
        json.dumps(good | {"id": 1003, "proline": None}),  # line 5: null
    ]
    (landing / "z-planted.jsonl").write_text("\n".join(planted) + "\n")
    (landing / "empty.jsonl").write_bytes(b"")
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.max_rejected_fraction=0.05", conf="conf/wine.yaml")

    summary = stage("prepare", spark, cfg)

    assert summary["input_rows"] == 178 + 6 == summary["accepted"] + summary["rejected"]
    assert (summary["accepted"], summary["rejected"], summary["input_files"]) == (178, 6, 4)
    rejected = read_table(summary, "rejected").set_index("key")
    planted_file = f"file:{landing}/z-planted.jsonl"
    assert rejected.loc["1000", "reason"] == "line 1: column 'alcohol': expected a number, got 'abc'"
    assert rejected.loc["z-planted.jsonl:2", "reason"].startswith("line 2: not valid JSON")
    assert rejected.loc["5", "reason"] == f"duplicate key 5 (first seen in file:{landing}/part-00000.jsonl line 6)"
    assert rejected.loc["5", "source"] == planted_file and rejected.loc["5", "row"] == 3
    assert rejected.loc["1002", "reason"].startswith("line 4: label 'cultivar': 'class_9' is not one of the classes")
    assert rejected.loc["1003", "reason"] == "line 5: column 'proline' is null"
    assert rejected.loc["empty.jsonl", "reason"] == "empty file"

    rows = split_rows(summary)
    assert list(read_table(summary, "train").columns) == ["key", "source", "label", "label_name", "features"]
    assert len(rows) == 178 and rows["key"].is_unique
    assert (rows["label_name"] == [f"class_{i}" for i in rows["label"]]).all()
    x = {s: np.stack(rows.loc[rows["split"] == s, "features"]) for s in SPLITS}
    assert x["train"].shape[1] == 13
    np.testing.assert_allclose(x["train"].mean(0), 0, atol=1e-5)  # fitted on train only ...
    np.testing.assert_allclose(x["train"].std(0), 1, atol=1e-4)
    assert np.abs(x["val"].mean(0)).max() > 0.01  # ... and applied unchanged to val
    stats = read_table(summary, "stats").set_index("column")
    train_ids = rows.loc[rows["split"] == "train", "key"].astype(int)
    assert stats.loc["proline", "mean"] == pytest.approx(wine.set_index("id").loc[train_ids, "proline"].mean())

    meta = lake.history(summary["tables"]["train"]["uri"])[0]["metadata"]
    assert meta["dlpipe.job_id"] == summary["job_id"] and meta["dlpipe.source"] == str(landing)
    assert meta["dlpipe.state"] == f"{summary['tables']['stats']['uri']}@{summary['tables']['stats']['version']}"

    # above max_rejected_fraction: the rejects are written, no output table gets a new version
    strict = make_config(tmp_path, f"paths.landing={landing}", "data.max_rejected_fraction=0.01", conf="conf/wine.yaml")
    with pytest.raises(ValueError, match=r"6 of 184 rows under .* were rejected \(3.3%\), more than "
                                         r"data.max_rejected_fraction=0.01; no new version"):
        stage("prepare", spark, strict)
    for suffix in (*SPLITS, "stats"):
        assert lake.latest_version(summary["tables"][suffix]["uri"]) == summary["tables"][suffix]["version"]
    assert lake.latest_version(summary["tables"]["rejected"]["uri"]) == summary["tables"]["rejected"]["version"] + 1


def test_adult_append_is_idempotent_and_merge_upserts(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    adult = datasets.adult().iloc[:300]
    datasets.write_shards(adult.iloc[:200], landing, 2, "csv", prefix="a")
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.mode=append", conf="conf/adult.yaml")

    first = stage("prepare", spark, cfg)
    assert first["accepted"] == 200 and sum(first["tables"][s]["rows"] for s in SPLITS) == 200
    stats, train = read_table(first, "stats"), read_table(first, "train")
    assert len(train["features"][0]) == (stats["kind"] != "label").sum()
    train_rows = adult.set_index("id").loc[train["key"].astype(int)]
    assert list(stats.loc[stats["column"] == "workclass", "value"]) == sorted(set(train_rows["workclass"]))

    again = stage("prepare", spark, cfg)  # same landing zone: nothing new
    assert again["input_files"] == 0 and again["input_rows"] == 0
    assert {s: lake.latest_version(first["tables"][s]["uri"]) for s in SPLITS} == \
           {s: first["tables"][s]["version"] for s in SPLITS}

    extra = pd.concat([adult.iloc[200:300], adult.iloc[[3]]])  # 100 new rows and key 3 again
    datasets.write_shards(extra, landing, 1, "csv", prefix="b")
    second = stage("prepare", spark, cfg)
    assert (second["input_files"], second["accepted"], second["rejected"]) == (1, 100, 1)
    rejected = read_table(second, "rejected").set_index("key")
    assert rejected.loc["3", "reason"].startswith("duplicate key 3 already in ") and "adult_" in rejected.loc["3", "reason"]
    rows = split_rows(second)
    assert len(rows) == 300 and rows["key"].is_unique
    assert second["tables"]["stats"] == first["tables"]["stats"] | {"fitted_by_this_job": False}  # not refitted

    flipped = adult.iloc[[0]].assign(income=">50K" if adult.iloc[0]["income"] == "<=50K" else "<=50K")
    new = adult.iloc[[0]].assign(id=99_999)
    datasets.write_shards(pd.concat([flipped, new]), landing, 1, "csv", prefix="c")
    merge = make_config(tmp_path, f"paths.landing={landing}", "data.mode=merge", conf="conf/adult.yaml")
    merged = stage("prepare", spark, merge)
    assert (merged["input_files"], merged["accepted"], merged["rejected"]) == (1, 2, 0)
    rows = split_rows(merged).set_index("key")
    assert len(rows) == 301 and rows.index.is_unique
    assert rows.loc["0", "label_name"] == flipped.iloc[0]["income"]
    assert rows.loc["0", "source"].endswith("c-00000.csv") and "99999" in rows.index


@pytest.mark.parametrize("conf", ["adult", "wine", "movielens", "reviews", "gutenberg", "sunspots", "elec_equip"])
def test_dataset_confs_load(conf):
    from dlpipe.config import load_config

    cfg = load_config(f"conf/{conf}.yaml")
    # a series is forecast by a recurrent net (conf/sunspots.yaml, conf/elec_equip.yaml)
    model = "rnn" if cfg.data.kind == "timeseries" else "cnn"
    assert cfg.data.dataset in datasets.DATASETS and cfg.data.kind != "images" and cfg.model.name == model


@pytest.mark.parametrize("override, message", [
    ("data.kind=graph", "config key 'data.kind': expected one of ['images', 'table', 'ratings', 'text', 'timeseries', 'trees'], got 'graph'"),
    ("data.mode=upsert", "config key 'data.mode': expected one of ['overwrite', 'append', 'merge'], got 'upsert'"),
    ("data.table.label=''", "config key 'data.table.label': expected the name of the label column"),
    ("data.table.task=ranking", "config key 'data.table.task': expected one of ['classification', 'regression']"),
    ("data.table.numeric=[age, age]", "expected distinct columns"),
    ("data.dataset=iris", "config key 'data.dataset': expected one of ['adult', 'wine', "),
])
def test_table_config_errors_name_the_key(override, message):
    from dlpipe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("conf/adult.yaml", [override])


def test_is_timestamp_agrees_with_how_parse_time_reads_a_time():
    from pipelines.records import is_timestamp, parse_time

    for number in ("1900", " 1749.5 ", 1990):
        assert not is_timestamp(number) and parse_time(number) == float(number)
    assert is_timestamp("2010-01-01") and parse_time("2010-01-01") == 1262304000.0


def test_timeseries_config_errors_name_the_key():
    from dlpipe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="config key 'data.timeseries.test_start': expected a time after val_start='1900', got '1800'"):
        load_config("conf/sunspots.yaml", ["data.timeseries.test_start='1800'"])
    with pytest.raises(ConfigError, match="config key 'data.timeseries.val_start': expected a number or a timestamp, got 'soon'"):
        load_config("conf/sunspots.yaml", ["data.timeseries.val_start=soon"])
    with pytest.raises(ConfigError, match="config key 'data.text.max_length': expected a positive integer, got 0"):
        load_config("conf/reviews.yaml", ["data.text.max_length=0"])


def test_regression_label_is_a_double(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    wine = datasets.wine()
    datasets.write_shards(wine, landing, 1, "jsonl")
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.table.task=regression", "data.table.label=proline",
                      "data.table.numeric=[alcohol, hue]", "data.table.categorical=[cultivar]", "data.table.classes=[]",
                      conf="conf/wine.yaml")
    summary = stage("prepare", spark, cfg)
    rows = split_rows(summary).set_index("key")
    assert list(read_table(summary, "train").columns) == ["key", "source", "label", "features"]
    assert rows["label"].dtype == np.float64 and len(rows) == 178
    assert (rows["label"].sort_index() == wine.set_index(wine["id"].astype(str))["proline"].sort_index()).all()
    assert summary["features"] == 2 + 3  # two standardized columns, three cultivars one-hot


def test_features_are_standardized_numbers_then_one_hot_categories():
    """transform on a few staged rows, against the same vector built by hand: a value train never
    saw (and a null) is all zeros in its column's block."""
    from types import SimpleNamespace

    import pyarrow as pa

    from pipelines.tables import transform

    state = {"numeric": [("age", 40.0, 10.0), ("hours", 35.0, 0.0)],
             "categorical": [("color", ["blue", "red"]), ("size", ["L", "M", "S"])], "classes": ["no", "yes"]}
    staged = pa.record_batch({"key": ["k1", "k2", "k3"], "source": ["f"] * 3, "split": ["train", "val", "test"],
                              "num": [[50.0, 40.0], [30.0, 35.0], [40.0, 30.0]],
                              "cat": [["red", "S"], ["green", "L"], ["blue", None]], "label_name": ["yes", "no", "yes"]})
    data = SimpleNamespace(table=SimpleNamespace(task="classification"))
    got = {r["key"]: r for r in transform(data, state)(staged).to_pylist()}
    expected = {"k1": [1.0, 5.0, 0, 1, 0, 0, 1], "k2": [-1.0, 0.0, 0, 0, 1, 0, 0], "k3": [0.0, -5.0, 1, 0, 0, 0, 0]}
    for key, vector in expected.items():
        np.testing.assert_allclose(np.frombuffer(got[key]["features"], "<f4"), vector)  # stored: float32 bytes
    assert [got[k]["label"] for k in ("k1", "k2", "k3")] == [1, 0, 1]
    assert got["k2"]["split"] == "val" and got["k3"]["label_name"] == "yes"


def test_the_split_made_in_python_is_the_split_spark_makes(spark):
    """The table kind's parser gives each row its split in Python (pipelines.split.hash_split_arrow);
    it must be the one Spark's hash_split gives every other kind and every table written before."""
    import pyarrow as pa

    from pipelines.split import hash_split, hash_split_arrow

    keys = [str(i) for i in range(3000)] + ["", "ümlaut", "键", "x" * 300, "part-00001.csv:17"]
    fractions = {"train": 0.7, "val": 0.2, "test": 0.1}
    spark_split = {r["key"]: r["split"] for r in hash_split(spark.createDataFrame([(k,) for k in keys], "key string"),
                                                             fractions).collect()}
    python_split = hash_split_arrow(pa.array(keys), fractions).to_pylist()
    assert python_split == [spark_split[k] for k in keys]
    assert set(python_split) == {"train", "val", "test"}


def test_the_state_merged_from_batches_is_the_state_of_all_train_rows():
    """fit_part on uneven batches, merged: the mean and population std of every numeric column, the
    sorted values of every categorical column (train rows only) and every label seen, as numpy
    gives them on all the rows at once."""
    from types import SimpleNamespace

    import pandas as pd
    import pyarrow as pa

    from pipelines.tables import fit_part, merge_parts

    rng = np.random.default_rng(0)
    n = 5000
    num = np.column_stack([rng.normal(1e5, 3e4, n), rng.integers(0, 90, n)]).astype(np.float64)
    cat = np.column_stack([rng.choice(["a", "b", "c"], n), rng.choice(["x", "y"], n)])
    split = rng.choice(["train", "val", "test"], n, p=[0.8, 0.1, 0.1])
    cat[split != "train", 0] = "only-outside-train"
    label = rng.choice(["<=50K", ">50K"], n)
    data = SimpleNamespace(table=SimpleNamespace(task="classification", numeric=["fnlwgt", "age"],
                                                 categorical=["color", "size"], classes=[]))
    part, parts = fit_part(data), []
    for lo, hi in [(0, 1), (1, 700), (700, 701), (701, n)]:
        batch = pa.record_batch({"split": split[lo:hi], "num": num[lo:hi].tolist(), "cat": cat[lo:hi].tolist(),
                                 "label_name": label[lo:hi]})
        parts.append(part(batch).to_pandas())
    state = merge_parts(pd.concat(parts), data)
    train = split == "train"
    np.testing.assert_allclose([m for _, m, _ in state["numeric"]], num[train].mean(0), rtol=1e-12)
    np.testing.assert_allclose([s for _, _, s in state["numeric"]], num[train].std(0), rtol=1e-12)
    assert state["categorical"] == [("color", ["a", "b", "c"]), ("size", ["x", "y"])]
    assert state["classes"] == ["<=50K", ">50K"]
