"""TableRef: the one form of a table version in summaries, params, tags and config keys; "latest"
resolved once, a missing table or version named with its config key."""

import pytest
from pyspark.sql import Row

from dlpipe import lake
from dlpipe.errors import InputNotFound
from dlpipe.refs import TableRef, resolve, split_spec


def test_parse_and_print_round_trip():
    ref = TableRef.parse("s3://bucket/lake/x_train@12")
    assert ref == ("s3://bucket/lake/x_train", 12) and str(ref) == "s3://bucket/lake/x_train@12"
    assert TableRef.of(ref.to_dict()) == ref == TableRef.of(str(ref))
    assert split_spec("hdfs://user@namenode/lake/t") == ("hdfs://user@namenode/lake/t", None)
    with pytest.raises(ValueError, match="expected <table uri>@<version>"):
        TableRef.parse("/lake/x_train")


def test_resolve_latest_explicit_and_missing(spark, tmp_path):
    uri = str(tmp_path / "t")
    for n in range(3):
        lake.write_table(spark.createDataFrame([Row(n=n)]), uri)
    assert resolve("", uri) == (uri, 2) and resolve(uri) == (uri, 2)
    assert resolve(f"{uri}@1") == (uri, 1)
    with pytest.raises(InputNotFound, match=r"has no version 7 \(config key 'score.input'\); the latest is 2"):
        resolve(f"{uri}@7", key="score.input")
    with pytest.raises(InputNotFound, match=r"no Delta table at .*/nothing \(config key 'train.tables.val'\)"):
        resolve(str(tmp_path / "nothing"), key="train.tables.val")
