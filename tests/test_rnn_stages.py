"""Recurrent models through the stages on small real slices, real Spark + Delta + MLflow: the
sentiment LSTM land -> prepare -> train -> evaluate (registered, champion) -> score (raw text in,
probabilities out, a bad row kept with its reason), and the character-level text pipeline
(data.text.unit: char) with a tiny language model trained, evaluated (test_bpc), registered as
champion and sampled by `generate` from models:/<name>@champion."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from dlpipe import datasets
from dlpipe.scoring_sequence import ONE_TOKEN
from dlpipe.spark import ENGINE_KEY
from pipelines.text import tokenize
from tests.conftest import make_config, read_table, split_rows, stage, with_run


@pytest.fixture(autouse=True)
def _delta_rs(spark):
    """These tests write the lake with delta-rs (half the time of delta-spark's 50-task snapshots on
    2 cores); tests/test_lake.py covers both engines."""
    spark.conf.set(ENGINE_KEY, "rs")
    yield
    spark.conf.set(ENGINE_KEY, "spark")


@pytest.mark.slow
def test_sentiment_lstm_train_evaluate_register_score(spark, tmp_path):
    import deltalake

    landing = tmp_path / "landing"
    landing.mkdir()
    reviews = datasets.womens_reviews().dropna(subset=["review_text"]).iloc[:400]
    datasets.write_shards(reviews, landing, 2, "jsonl")
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.text.max_length=40", "train.epochs=1",
                      "train.backend=local", "model.rnn.hidden=16", "model.rnn.embedding=16", "registry.min_accuracy=0.5",
                      "registry.model_name=sentiment_e2e", conf="conf/reviews_sentiment.yaml")
    stage("prepare", spark, cfg)
    trained = stage("train", spark, cfg)

    evaluated = stage("evaluate", spark, with_run(cfg, trained["run_id"]))

    m = evaluated["metrics"]
    assert evaluated["champion"] and evaluated["model_version"] == 1
    assert m["test_accuracy"] >= 0.5 and 0 <= m["test_roc_auc"] <= 1 and m["test_rows"] > 20
    test = deltalake.DeltaTable(cfg.table_uri("test"))
    planted = test.to_pandas().iloc[:1].assign(key="planted", text="?!")  # no word token: kept, with the reason
    deltalake.write_deltalake(cfg.table_uri("test"), planted, mode="append")

    scored = stage("score", spark, dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, input=cfg.table_uri("test"))))

    assert scored["model_uri"] == "models:/sentiment_e2e/1" and scored["predictions"]["rows_rejected"] == 1
    out = deltalake.DeltaTable(cfg.table_uri("predictions")).to_pandas().set_index("key")
    assert out.loc["planted", "rejected_reason"].startswith("no token; expected `text`")
    rows = read_table({"tables": {"test": evaluated["test_table"]}}, "test")
    assert len(out) == len(rows) + 1 and out.loc[rows["key"], "rejected_reason"].isna().all()
    probs = np.stack(out.loc[rows["key"], "probabilities"].to_numpy())
    assert probs.shape == (len(rows), 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (out.loc[rows["key"], "prediction"] == probs.argmax(1)).all()
    assert m["test_accuracy"] == pytest.approx((out.loc[rows["key"], "prediction"].to_numpy() == rows["label"].to_numpy()).mean())


@pytest.mark.slow
def test_char_unit_tokens_are_characters_and_the_language_model_registers_and_generates(spark, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "part-00000.txt").write_text("Ab ab!\n\n   \nabc\nzzzz ab\n" + "ab cab\n" * 20)
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.text.min_count=3", "data.text.max_length=5",
                      "data.max_rejected_fraction=0.5", "train.epochs=1", "train.batch_size=4", "train.backend=local",
                      "train.max_rows=0", "model.rnn.layers=1", "model.rnn.hidden=8", "model.rnn.embedding=4",
                      "model.rnn.dropout=0", "registry.model_name=chars_e2e", conf="conf/gutenberg_chars.yaml")

    summary = stage("prepare", spark, cfg)

    assert summary["accepted"] == 23
    vocab = read_table(summary, "vocab")
    tokens = vocab[vocab["kind"] == "token"].set_index("token")
    rows = split_rows(summary)
    counts = pd.Series([c for text in rows.loc[rows["split"] == "train", "text"] for c in text]).value_counts()
    assert list(tokens.index[:2]) == ["<pad>", "<unk>"] and set(tokens.index[2:]) == set(counts[counts >= 3].index)
    assert {"a", "b", " "} <= set(tokens.index) and "A" not in tokens.index  # characters, case kept (lowercase: false)
    for r in rows.itertuples():
        assert list(r.tokens) == list(r.text) == tokenize(r.text, False, "char") and r.length == len(r.text)
        expected = [int(tokens["id"].get(t, 1)) for t in r.text[:5]]
        assert list(r.ids) == expected + [0] * (5 - len(expected))
    assert json.loads(json.dumps(summary["length"]))["max"] == 7

    trained = stage("train", spark, cfg)
    evaluated = stage("evaluate", spark, with_run(cfg, trained["run_id"]))
    assert evaluated["champion"] and 0 < evaluated["metrics"]["test_bpc"] < 10  # no threshold for a language model
    out = stage("generate", spark, cfg, model="", prompt="ab", length=6, temperature=0.0, seed=0)
    assert out["model_uri"] == "models:/chars_e2e@champion" and len(out["generated"]) == 6
    assert out["text"] == "ab" + out["generated"] and set(out["generated"]) <= set(tokens.index[2:])

    alone = stage("generate", spark, cfg, model="", prompt="a", length=2, temperature=0.0, seed=0)
    assert alone["prompt_bits_per_token"] is None and json.loads(json.dumps(alone, allow_nan=False))["text"].startswith("a")

    import deltalake
    planted = deltalake.DeltaTable(cfg.table_uri("test")).to_pandas().iloc[:1].assign(key="planted", text="a")
    deltalake.write_deltalake(cfg.table_uri("test"), planted, mode="append")
    scored = stage("score", spark, dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, input=cfg.table_uri("test"))))
    out = deltalake.DeltaTable(cfg.table_uri("predictions")).to_pandas().set_index("key")
    assert scored["predictions"]["rows_rejected"] == 1 and pd.isna(out.loc["planted", "bits_per_token"])
    assert out.loc["planted", "rejected_reason"] == ONE_TOKEN
    assert out.drop(index="planted")["rejected_reason"].isna().all() and out.drop(index="planted")["bits_per_token"].gt(0).all()
