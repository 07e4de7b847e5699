import os
import re

import deltalake
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from dlpipe import lake

SCHEMA = "id long, n int, name string, x double, f float, af array<float>, ad array<double>, blob binary"


def rows(ids):
    return [
        (i, i * 2, f"row{i}", i / 4, i / 2, [i / 2, 0.25], [i / 4, -1.5], bytes([i % 256, 7]))
        for i in ids
    ]


def contents(df):
    return sorted((tuple(r) for r in df.collect()), key=lambda r: r[0])


VERSIONS = {0: rows(range(5)), 1: rows(range(10, 13)), 2: rows(range(10, 13)) + rows([20, 21])}


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    """v0: write, v1: overwrite, v2: append."""
    uri = str(tmp_path_factory.mktemp("lake") / "t")
    df = lambda ids: spark.createDataFrame(rows(ids), SCHEMA).repartition(2)  # noqa: E731
    v0 = lake.write_table(df(range(5)), uri, metadata={"step": "v0"})
    v1 = lake.write_table(df(range(10, 13)), uri, mode="overwrite", metadata={"step": "v1"})
    v2 = lake.write_table(df([20, 21]), uri, mode="append", metadata={"step": "v2"})
    assert (v0, v1, v2) == (0, 1, 2)
    return uri


def test_each_version_reads_back_exactly(spark, table):
    for version, expected in VERSIONS.items():
        df = lake.read_table(spark, table, version)
        assert df.schema.simpleString() == spark.createDataFrame([], SCHEMA).schema.simpleString()
        assert contents(df) == expected
    assert contents(lake.read_table(spark, table)) == VERSIONS[2]
    assert lake.latest_version(table) == 2


def test_delta_rs_reads_every_version_and_our_metadata(table):
    for version, expected in VERSIONS.items():
        arrow = deltalake.DeltaTable(table, version=version).to_pyarrow_table()
        assert sorted(arrow.column("id").to_pylist()) == [r[0] for r in expected]
        assert sorted(arrow.column("blob").to_pylist()) == sorted(r[7] for r in expected)
    raw = deltalake.DeltaTable(table).history()
    assert ['"step": "v2"' in c["userMetadata"] for c in raw] == [True, False, False]
    ours = lake.history(table)
    assert [(h["version"], h["metadata"]) for h in ours] == [
        (2, {"step": "v2"}),
        (1, {"step": "v1"}),
        (0, {"step": "v0"}),
    ]
    assert ours[0]["operation"] == "WRITE" and ours[0]["timestamp"] >= ours[2]["timestamp"]


def test_table_files_exist_and_hold_the_rows(table):
    files = {v: lake.table_files(table, v) for v in VERSIONS}
    for version, paths in files.items():
        assert all(os.path.isabs(p) and os.path.exists(p) for p in paths)
        assert sum(pq.read_metadata(p).num_rows for p in paths) == len(VERSIONS[version])
    assert not set(files[0]) & set(files[1])  # overwrite removed v0's files
    assert set(files[1]) < set(files[2])  # append kept them


def test_missing_table_and_version_errors_name_the_uri(spark, table, tmp_path):
    missing = str(tmp_path / "nothing")
    assert lake.latest_version(missing) is None
    for call in (
        lambda: lake.read_table(spark, missing),
        lambda: lake.table_files(missing, 0),
        lambda: lake.history(missing),
    ):
        with pytest.raises(FileNotFoundError, match=re.escape(missing)):
            call()
    with pytest.raises(ValueError, match=re.escape(table) + r".*version 7.*latest is 2"):
        lake.read_table(spark, table, 7)
    with pytest.raises(ValueError, match=re.escape(table) + r".*version -1"):
        lake.table_files(table, -1)
    with pytest.raises(ValueError, match="upsert"):
        lake.write_table(spark.range(1), table, mode="upsert")


def test_append_with_another_schema_is_refused(spark, table):
    with pytest.raises(ValueError, match=re.escape(table)):
        lake.write_table(spark.range(3), table, mode="append")
    assert lake.latest_version(table) == 2


def test_empty_table_has_the_schema(spark, tmp_path):
    uri = str(tmp_path / "empty")
    assert lake.write_table(spark.createDataFrame([], SCHEMA), uri) == 0
    df = lake.read_table(spark, uri)
    assert df.count() == 0
    assert df.schema.simpleString() == spark.createDataFrame([], SCHEMA).schema.simpleString()


def test_failed_job_commits_nothing(spark, tmp_path):
    uri = str(tmp_path / "t")
    lake.write_table(spark.createDataFrame(rows(range(4)), SCHEMA), uri)

    @F.udf("long")
    def explode_on_3(i):
        if i == 3:
            raise RuntimeError("boom on row 3")
        return i

    bad = spark.createDataFrame(rows(range(6)), SCHEMA).withColumn("id", explode_on_3("id"))
    with pytest.raises(Exception, match="boom on row 3"):
        lake.write_table(bad, uri, metadata={"step": "bad"})
    assert lake.latest_version(uri) == 0
    assert [h["version"] for h in lake.history(uri)] == [0]
    assert contents(lake.read_table(spark, uri)) == rows(range(4))


def test_native_delta_engine(spark, tmp_path):
    if not lake.native_delta_available(spark):
        pytest.skip(
            "delta-spark JVM classes not on the classpath: io.delta.tables.DeltaTable not "
            "loadable or spark.sql.extensions lacks io.delta.sql.DeltaSparkSessionExtension"
        )
    uri = str(tmp_path / "native")
    assert lake.write_table(spark.createDataFrame(rows(range(3)), SCHEMA), uri, metadata={"a": "1"}) == 0
    assert lake.write_table(spark.createDataFrame(rows([9]), SCHEMA), uri, mode="append") == 1
    assert contents(lake.read_table(spark, uri, 0)) == rows(range(3))
    assert contents(lake.read_table(spark, uri)) == rows([0, 1, 2, 9])
    assert lake.history(uri)[1]["metadata"] == {"a": "1"}
    assert lake.write_table(spark.createDataFrame(rows([5]), SCHEMA), uri, mode="overwrite") == 2
    assert lake.vacuum(uri, 0, dry_run=True, spark=spark)  # native VACUUM ... RETAIN 0 HOURS DRY RUN lists v0/v1 files
    lake.vacuum(uri, 0, spark=spark)
    assert lake.vacuum(uri, 0, dry_run=True, spark=spark) == []
    assert contents(lake.read_table(spark, uri)) == rows([5])
