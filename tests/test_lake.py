import os
import re
import subprocess
import sys

import deltalake
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from dlpipe import lake
from dlpipe.spark import ENGINE_KEY

SCHEMA = "id long, n int, name string, x double, f float, af array<float>, ad array<double>, blob binary"


def rows(ids):
    return [
        (i, i * 2, f"row{i}", i / 4, i / 2, [i / 2, 0.25], [i / 4, -1.5], bytes([i % 256, 7]))
        for i in ids
    ]


def contents(df):
    return sorted((tuple(r) for r in df.collect()), key=lambda r: r[0])


VERSIONS = {0: rows(range(5)), 1: rows(range(10, 13)), 2: rows(range(10, 13)) + rows([20, 21])}


@pytest.fixture(scope="module", params=["spark", "rs"])
def engine(request):
    """The Delta engine a test runs with: delta-spark or delta-rs (`lake.engine`)."""
    return request.param


@pytest.fixture(autouse=True)
def _session_engine(request, spark):
    """The session writes with the test's `engine` (delta-spark for the tests without one)."""
    spark.conf.set(ENGINE_KEY, request.getfixturevalue("engine") if "engine" in request.fixturenames else "spark")
    yield
    spark.conf.set(ENGINE_KEY, "spark")


@pytest.fixture(scope="module")
def table(spark, engine, tmp_path_factory):
    """v0: write, v1: overwrite, v2: append."""
    spark.conf.set(ENGINE_KEY, engine)
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


def test_delta_rs_reads_every_version_and_our_metadata(table, engine):
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
    assert {h["engine"] for h in ours} == {engine}


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


def test_empty_table_has_the_schema(spark, engine, tmp_path):
    uri = str(tmp_path / "empty")
    assert lake.write_table(spark.createDataFrame([], SCHEMA), uri) == 0
    df = lake.read_table(spark, uri)
    assert df.count() == 0
    assert df.schema.simpleString() == spark.createDataFrame([], SCHEMA).schema.simpleString()


def test_appending_no_rows_keeps_the_table_readable_at_the_returned_version(spark, engine, tmp_path):
    uri = str(tmp_path / "t")
    assert lake.write_table(spark.createDataFrame(rows(range(2)), SCHEMA), uri) == 0
    version = lake.write_table(spark.createDataFrame([], SCHEMA), uri, mode="append")
    assert version == {"spark": 0, "rs": 1}[engine]  # delta-spark commits nothing for no rows
    assert contents(lake.read_table(spark, uri, version)) == rows(range(2))
    empty = str(tmp_path / "empty")
    assert lake.write_table(spark.createDataFrame([], SCHEMA), empty) == 0
    again = lake.write_table(spark.createDataFrame([], SCHEMA), empty, mode="overwrite")
    assert again == {"spark": 0, "rs": 1}[engine] and lake.read_table(spark, empty, again).count() == 0


def test_failed_job_commits_nothing(spark, engine, tmp_path):
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
    assert lake.native_delta_available(spark) and lake.engine(spark) == "spark"  # `make test` fetched the jars
    uri = str(tmp_path / "native")
    assert lake.write_table(spark.createDataFrame(rows(range(3)), SCHEMA), uri, metadata={"a": "1"}) == 0
    assert lake.write_table(spark.createDataFrame(rows([9]), SCHEMA), uri, mode="append") == 1
    assert contents(lake.read_table(spark, uri, 0)) == rows(range(3))
    assert contents(lake.read_table(spark, uri)) == rows([0, 1, 2, 9])
    assert lake.history(uri)[1]["metadata"] == {"a": "1"}
    info = [c.get("engineInfo", "") for c in deltalake.DeltaTable(uri).history()]
    assert all(i.startswith("Apache-Spark/4.2.0 Delta-Lake/4.4.0") for i in info), info
    assert lake.write_table(spark.createDataFrame(rows([5]), SCHEMA), uri, mode="overwrite") == 2
    assert lake.vacuum(uri, 0, dry_run=True, spark=spark)  # native VACUUM ... RETAIN 0 HOURS DRY RUN lists v0/v1 files
    lake.vacuum(uri, 0, spark=spark)
    assert lake.vacuum(uri, 0, dry_run=True, spark=spark) == []
    assert contents(lake.read_table(spark, uri)) == rows([5])
    assert [h["operation"] for h in lake.history(uri)][:2] == ["VACUUM END", "VACUUM START"]


@pytest.mark.parametrize("first,second", [("spark", "rs"), ("rs", "spark")])
def test_engines_read_and_append_to_each_others_tables(spark, tmp_path, first, second):
    uri = str(tmp_path / "mixed")
    df = lambda ids: spark.createDataFrame(rows(ids), SCHEMA)  # noqa: E731
    try:
        spark.conf.set(ENGINE_KEY, first)
        assert lake.write_table(df(range(3)), uri, metadata={"by": first}) == 0
        spark.conf.set(ENGINE_KEY, second)
        assert contents(lake.read_table(spark, uri)) == rows(range(3))
        assert lake.write_table(df([7]), uri, mode="append", metadata={"by": second}) == 1
        assert lake.replace_where(df([7, 8]).withColumn("name", F.lit("row7")), uri, {"name": "row7"}) == 2
        for engine in (first, second):
            spark.conf.set(ENGINE_KEY, engine)
            assert contents(lake.read_table(spark, uri)) == rows(range(3)) + [
                (i, i * 2, "row7", i / 4, i / 2, [i / 2, 0.25], [i / 4, -1.5], bytes([i, 7])) for i in (7, 8)]
            assert contents(lake.read_table(spark, uri, 1)) == rows([0, 1, 2, 7])  # time travel past later commits
            assert contents(lake.read_table(spark, uri, 0)) == rows(range(3))
        history = lake.history(uri)
        assert [(h["version"], h["engine"]) for h in history] == [(2, second), (1, second), (0, first)]
        assert [h["metadata"].get("by") for h in history] == [None, second, first]
        assert sorted(deltalake.DeltaTable(uri).to_pyarrow_table().column("id").to_pylist()) == [0, 1, 2, 7, 8]
    finally:
        spark.conf.set(ENGINE_KEY, "spark")


def test_deleted_rows_never_reach_a_file_reader(spark, tmp_path):
    """A native MERGE that deletes rows on a table with deletion vectors: the rows stay in the Parquet
    files, so every reader of whole files (training's shard loader, delta-rs reads) must refuse the
    snapshot until the files are rewritten; delta-spark reads it correctly."""
    from delta.tables import DeltaTable as SparkDeltaTable

    uri = str(tmp_path / "dv")
    lake.write_table(spark.createDataFrame(rows(range(10)), SCHEMA).coalesce(1), uri)
    spark.sql(f"ALTER TABLE delta.`{uri}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    (SparkDeltaTable.forPath(spark, uri).alias("t").merge(spark.range(3).alias("u"), "t.id = u.id")
     .whenMatchedDelete().execute())
    latest = lake.latest_version(uri)
    assert sorted(r.id for r in lake.read_table(spark, uri).collect()) == list(range(3, 10))
    for call in (lambda: lake.table_files(uri, latest), lambda: lake.table_rows(uri, latest)):
        with pytest.raises(ValueError, match=re.escape(uri) + r".*deletion vectors on 1 file.*REORG TABLE"):
            call()
    try:
        spark.conf.set(ENGINE_KEY, "rs")
        with pytest.raises(ValueError, match="deletion vectors"):
            lake.read_table(spark, uri)
    finally:
        spark.conf.set(ENGINE_KEY, "spark")
    assert len(lake.table_files(uri, 0)) == 1  # the version before the MERGE has no deletion vectors
    spark.sql(f"REORG TABLE delta.`{uri}` APPLY (PURGE)")
    purged = lake.latest_version(uri)
    ids = sorted(i for f in lake.table_files(uri, purged) for i in pq.read_table(f).column("id").to_pylist())
    assert ids == list(range(3, 10)) and lake.table_rows(uri, purged) == 7


def test_column_mapping_is_refused_by_file_readers(spark, tmp_path):
    uri = str(tmp_path / "cm")
    lake.write_table(spark.createDataFrame(rows(range(2)), SCHEMA), uri)
    spark.sql(f"ALTER TABLE delta.`{uri}` SET TBLPROPERTIES ('delta.columnMapping.mode' = 'name')")
    spark.sql(f"ALTER TABLE delta.`{uri}` RENAME COLUMN name TO label_name")
    with pytest.raises(ValueError, match=re.escape(uri) + r".*column mapping \(delta.columnMapping.mode=name\)"):
        lake.table_files(uri, lake.latest_version(uri))
    assert "label_name" in lake.read_table(spark, uri).columns  # delta-spark maps the names


def test_engine_spark_without_jars_is_one_line_before_spark_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", "lake", "vacuum", "--table", str(tmp_path / "t"), "--retain-hours", "1",
         "--set", "lake.engine=spark", "--set", f"spark.jars_dir={tmp_path}/no-jars"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dlpipe: config error: lake.engine=spark: no delta-spark jars in spark.jars_dir={tmp_path}/no-jars and none "
        "given to Spark; run `make setup` (Maven fetches deploy/jars/pom.xml into .work/jars), or give Spark the jars "
        "with --packages io.delta:delta-spark_4.2_2.13:4.4.0"]


def test_conditional_write_lands_only_on_the_version_it_read(spark, engine, tmp_path, monkeypatch):
    """write_table(expect=v): the commit lands as v + 1 or not at all (ConflictError, one line
    naming the job that moved the table); also when the table moves between the check and the
    commit (delta-spark: Delta's application transaction; delta-rs: no commit retries)."""
    from dlpipe.errors import ConflictError

    uri = str(tmp_path / "t")
    df = spark.range(3)
    assert lake.write_table(df, uri, expect=None) == 0
    assert lake.write_table(df, uri, mode="append", expect=0, metadata={"dlpipe.job_id": "j1", "dlpipe.step": "prepare"}) == 1
    with pytest.raises(ConflictError, match=r"was at version 0 when this job read it and is now at version 1 "
                                            r"\(version 1 by prepare job j1\)"):
        lake.write_table(df, uri, mode="append", expect=0)
    with pytest.raises(ConflictError, match="did not exist when this job read it"):
        lake.write_table(df, uri, expect=None)
    # the table moves after the check: the commit itself refuses
    assert lake.write_table(df, uri, mode="append", expect=1) == 2
    real, stale = lake.latest_version, [1]  # the first look (the check) still sees version 1
    monkeypatch.setattr(lake, "latest_version", lambda u: stale.pop() if stale else real(u))
    with pytest.raises(ConflictError, match="was at version 1 when this job read it and is now at version 2"):
        lake.write_table(df, uri, mode="append", expect=1)
    monkeypatch.setattr(lake, "latest_version", real)
    assert lake.latest_version(uri) == 2 and lake.read_table(spark, uri).count() == 9
    assert lake.write_table(df, uri, mode="append", expect=2) == 3
