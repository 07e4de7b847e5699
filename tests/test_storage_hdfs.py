"""Raw data, Delta tables, checkpoints and training on HDFS: a real NameNode and DataNode on
127.0.0.1 (the `hdfs` fixture, tests/hdfs/), reached by Spark's JVM through its Hadoop client and
by every Python reader and writer (pyarrow, delta-rs) through hdfs-native."""

import json
import re
import threading
import time
from pathlib import Path

import deltalake
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from pyarrow import fs

from dlpipe import checkpoints, lake, storage
from dlpipe.refs import SPLITS
from dlpipe.spark import ENGINE_KEY
from pipelines.sources import Parser, list_files, read_parsed
from tests.conftest import make_config, stage, with_run

pytestmark = pytest.mark.slow


@pytest.fixture(params=["spark", "rs"])
def engine(request, spark):
    """The Delta engine the test writes with (`lake.engine`): delta-spark or delta-rs."""
    before = spark.conf.get(ENGINE_KEY, "auto")
    spark.conf.set(ENGINE_KEY, request.param)
    yield request.param
    spark.conf.set(ENGINE_KEY, before)


def _files(hdfs_fs, path):
    """{path: size} of the files under `path` (recursive)."""
    infos = hdfs_fs.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path: i.size for i in infos if i.type == fs.FileType.File}


def test_filesystem_lists_reads_writes_and_moves(hdfs):
    filesys, path = storage.filesystem(hdfs.url("/fs/a/x.bin"))
    assert path == "/fs/a/x.bin"
    filesys.create_dir("/fs/a", recursive=True)
    with filesys.open_output_stream(path) as out:
        out.write(b"first")
    info = filesys.get_file_info(path)
    assert (info.type, info.size) == (fs.FileType.File, 5)
    assert abs(info.mtime.timestamp() - time.time()) < 120  # Delta add actions need it
    assert filesys.get_file_info("/fs/nothing").type == fs.FileType.NotFound
    with filesys.open_output_stream("/fs/a/y.bin") as out:
        out.write(b"second")
    filesys.move("/fs/a/y.bin", path)  # replaces, as pyarrow's move does elsewhere
    with filesys.open_input_file(path) as f:
        assert f.read() == b"second"
    with filesys.open_input_stream(path) as f:
        assert f.read() == b"second"
    table = pa.table({"n": list(range(1000)), "s": [str(i) for i in range(1000)]})
    pq.write_table(table, "/fs/b/t.parquet", filesystem=filesys, row_group_size=100)
    assert pq.ParquetFile(filesys.open_input_file("/fs/b/t.parquet")).read_row_group(3).column("n")[0].as_py() == 300
    assert set(_files(filesys, "/fs")) == {"/fs/a/x.bin", "/fs/b/t.parquet"}
    assert filesys.get_file_info(fs.FileSelector("/fs/none", allow_not_found=True)) == []
    with pytest.raises(FileNotFoundError):
        filesys.get_file_info(fs.FileSelector("/fs/none"))
    filesys.delete_dir("/fs/b")
    assert set(_files(filesys, "/fs")) == {"/fs/a/x.bin"}


def test_spark_reads_and_writes_hdfs(spark, hdfs):
    uri = hdfs.url("/spark/numbers")
    spark.range(0, 500, numPartitions=3).selectExpr("id", "id * 2 AS twice").write.mode("overwrite").parquet(uri)
    assert storage.spark_uri(spark, uri) == uri  # the JVM has its own HDFS client
    back = spark.read.parquet(uri)
    assert back.count() == 500 and back.selectExpr("sum(twice)").first()[0] == 2 * sum(range(500))
    filesys, path = storage.filesystem(uri)
    parts = [p for p in _files(filesys, path) if p.endswith(".parquet")]
    assert parts and sum(pq.ParquetFile(filesys.open_input_file(p)).metadata.num_rows for p in parts) == 500


def test_landing_on_hdfs_is_read_with_spark_and_listed_with_pyarrow(spark, hdfs):
    """Spark's binaryFile reader over hdfs://, the zero-byte file kept (listed through hdfs-native),
    hidden and _-prefixed files skipped."""
    filesys, root = storage.filesystem(hdfs.url("/raw/listing"))
    for name, data in {"a/1.png": b"one", "a/2.png": b"two", "b/3.png": b"three", "b/empty.png": b"",
                       "a/.4.png.tmp": b"partial", "_SUCCESS": b"", "_tmp/5.png": b"five"}.items():
        filesys.create_dir(f"{root}/{name}".rsplit("/", 1)[0], recursive=True)
        with filesys.open_output_stream(f"{root}/{name}") as out:
            out.write(data)
    uri = hdfs.url("/raw/listing")
    assert list_files(uri) == [(f"{uri}/a/1.png", 3), (f"{uri}/a/2.png", 3), (f"{uri}/b/3.png", 5),
                               (f"{uri}/b/empty.png", 0)]
    raw = Parser("source string, content binary, error string", lambda paths, contents: pa.RecordBatch.from_pydict(
        {"source": paths, "content": contents, "error": [None] * len(paths)}))
    rows = {r.source: bytes(r.content) for r in read_parsed(spark, list_files(uri), raw).collect()}
    assert rows == {f"{uri}/a/1.png": b"one", f"{uri}/a/2.png": b"two", f"{uri}/b/3.png": b"three",
                    f"{uri}/b/empty.png": b""}


def test_delta_table_on_hdfs_with_time_travel(spark, hdfs, engine):
    uri = hdfs.url(f"/lake/numbers_{engine}")
    df = lambda lo, hi: spark.range(lo, hi, numPartitions=2).selectExpr("id", "CAST(id AS STRING) AS s")  # noqa: E731
    assert lake.engine(spark) == engine and lake.latest_version(uri) is None
    v0 = lake.write_table(df(0, 10), uri, metadata={"step": "v0"})
    v1 = lake.write_table(df(10, 15), uri, mode="append", metadata={"step": "v1"})
    v2 = lake.write_table(df(100, 103), uri, mode="overwrite", metadata={"step": "v2"})
    assert (v0, v1, v2) == (0, 1, 2) and lake.latest_version(uri) == 2
    expected = {0: list(range(10)), 1: list(range(15)), 2: [100, 101, 102]}
    for version, ids in expected.items():
        assert sorted(r.id for r in lake.read_table(spark, uri, version).collect()) == ids
        assert lake.table_rows(uri, version) == len(ids)
        files = lake.table_files(uri, version)
        assert files and all(f.startswith(f"{uri}/") for f in files)
        # what the training shard loader does: the snapshot's files through storage.filesystem
        filesys, _ = storage.filesystem(files[0])
        read = pa.concat_tables(pq.ParquetFile(filesys.open_input_file(storage.path_of(f))).read() for f in files)
        assert sorted(read.column("id").to_pylist()) == ids
        # and delta-rs by itself, given only the URI
        assert sorted(deltalake.DeltaTable(uri, version=version).to_pyarrow_table().column("id").to_pylist()) == ids
    assert [(h["version"], h["engine"], h["metadata"]) for h in lake.history(uri)] == [
        (2, engine, {"step": "v2"}), (1, engine, {"step": "v1"}), (0, engine, {"step": "v0"})]
    with pytest.raises(ValueError, match="has no version 7"):
        lake.read_table(spark, uri, 7)
    # the other engine appends to the same table; a version pinned before still reads the same rows
    other = "rs" if engine == "spark" else "spark"
    spark.conf.set(ENGINE_KEY, other)
    assert lake.write_table(df(200, 201), uri, mode="append", metadata={"step": "v3"}) == 3
    assert [h["engine"] for h in lake.history(uri)] == [other, engine, engine, engine]
    assert sorted(r.id for r in lake.read_table(spark, uri).collect()) == [100, 101, 102, 200]
    assert sorted(r.id for r in lake.read_table(spark, uri, 1).collect()) == expected[1]


def test_checkpoints_round_trip_and_resume_lookup_on_hdfs(hdfs):
    root = hdfs.url("/checkpoints")
    directory = checkpoints.run_dir(root, "nightly", "run-1")
    for epoch in (1, 2):
        uri = checkpoints.save(directory, {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}})
    assert uri == f"{root}/nightly/run-1/epoch-0002.pt"
    assert checkpoints.save(directory, {"epoch": 2, "model": {"w": torch.zeros(3)}}) == uri  # rewritten in place
    assert checkpoints.latest(directory) == uri
    state = checkpoints.load(uri)
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.zeros(3))
    assert checkpoints.find_resumable(root, "nightly", finished=lambda run_id: False) == ("run-1", uri)
    assert checkpoints.find_resumable(root, "nightly", finished=lambda run_id: True) is None
    assert checkpoints.latest(f"{root}/nightly/no-such-run") is None


def test_stopped_datanode_mid_write_leaves_previous_version_readable(spark, hdfs, engine, tmp_path):
    """The DataNode stops while a write is half done (its first task's file is on HDFS, the
    second task is still running): the write fails, nothing is committed, and once the DataNode
    is back the table reads exactly its previous version; the next write commits normally."""
    uri = hdfs.url(f"/lake/datanode_failure_{engine}")
    filesys, path = storage.filesystem(uri)
    before = lake.write_table(spark.range(0, 100, numPartitions=2).toDF("x"), uri)
    committed = set(lake.table_files(uri, before))
    started, resume = tmp_path / "second-task-started", tmp_path / "datanode-stopped"

    def hold_second_task(batches):
        from pyspark import TaskContext

        if TaskContext.get().partitionId() == 1:
            started.touch()
            deadline = time.monotonic() + 300
            while not resume.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        yield from batches

    more = spark.range(100, 200, numPartitions=2).toDF("x").mapInArrow(hold_second_task, "x long")
    failure: list[BaseException] = []

    def write():
        try:
            lake.write_table(more, uri, mode="append")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + 300
    written = []
    while time.monotonic() < deadline and not (started.exists() and written):
        written = [p for p, size in _files(filesys, path).items()
                   if p.endswith(".parquet") and size and f"{uri}{p[len(path):]}" not in committed]
        time.sleep(0.2)
    assert started.exists() and written, "the write did not reach the point where one task is done, one running"
    hdfs.stop_datanode()
    try:
        resume.touch()
        writer.join(timeout=300)
        assert not writer.is_alive(), "the write hung with the DataNode down"
        assert failure, "the write succeeded with the only DataNode down"
        # hdfs-native (tasks writing with pyarrow) or Hadoop's client (Spark writing Delta natively)
        assert re.search(r"Connection refused|could only be written to 0 of the 1 minReplication", str(failure[0]))
    finally:
        hdfs.start_datanode()
    assert lake.latest_version(uri) == before
    assert sorted(r.x for r in lake.read_table(spark, uri).collect()) == list(range(100))
    assert sorted(deltalake.DeltaTable(uri).to_pyarrow_table().column("x").to_pylist()) == list(range(100))
    assert not set(f"{uri}{p[len(path):]}" for p in written) & set(lake.table_files(uri, before))
    after = lake.write_table(spark.range(100, 150, numPartitions=2).toDF("x"), uri, mode="append")
    assert after == before + 1
    assert sorted(r.x for r in lake.read_table(spark, uri).collect()) == list(range(150))
    assert sorted(r.x for r in lake.read_table(spark, uri, before).collect()) == list(range(100))


@pytest.fixture(scope="module")
def hdfs_landing(small_landing, hdfs):
    """10 real PNGs per class, one zero-byte PNG, and a hidden and a _-prefixed file that must be
    skipped, uploaded to hdfs://.../landing/fashion: (config, landing URI)."""
    cfg, _ = small_landing
    uri = hdfs.url("/landing/fashion")
    filesys, root = storage.filesystem(uri)
    local = Path(cfg.paths.landing)
    for folder in cfg.data.classes:
        filesys.create_dir(f"{root}/{folder}", recursive=True)
        for png in sorted((local / folder).glob("*.png"))[:10]:
            with filesys.open_output_stream(f"{root}/{folder}/{png.name}") as out:
                out.write(png.read_bytes())
    for name in (f"{cfg.data.classes[0]}/empty.png", f"{cfg.data.classes[0]}/.partial.png", "_SUCCESS"):
        with filesys.open_output_stream(f"{root}/{name}"):
            pass
    return cfg, uri


def test_end_to_end_on_hdfs(spark, hdfs, hdfs_landing, tmp_path):
    """land (hdfs://) -> prepare -> Delta lake on hdfs:// -> train 1 epoch on 2 Horovod workers
    that read their shards from HDFS and checkpoint to hdfs:// -> evaluate -> score into hdfs://."""
    small, landing = hdfs_landing
    cfg = make_config(
        tmp_path, f"paths.landing={landing}", f"paths.lake={hdfs.url('/e2e/lake')}",
        f"train.checkpoint_uri={hdfs.url('/e2e/checkpoints')}", f"data.name={small.data.name}",
        f"data.classes={json.dumps(small.data.classes)}", "data.max_rejected_fraction=0.05",
        "train.epochs=1", "train.batch_size=16", "train.checkpoint_every=1",
        "model.cnn.blocks=[{channels: 8}, {channels: 16}]", "model.cnn.hidden=[32]",
        "registry.min_accuracy=0.0", "registry.model_name=hdfs_cnn",
    )
    prepared = stage("prepare", spark, cfg)
    assert (prepared["input_files"], prepared["accepted"], prepared["rejected"]) == (101, 100, 1)
    for split in SPLITS:
        table = prepared["tables"][split]
        assert table["uri"] == hdfs.url(f"/e2e/lake/{small.data.name}_{split}")
        assert lake.history(table["uri"])[0]["engine"] == lake.engine(spark) == "spark"  # delta-spark on HDFS
        files = lake.table_files(table["uri"], table["version"])
        assert files and all(f.startswith(hdfs.uri + "/") for f in files)  # what the workers read
    assert sum(prepared["tables"][s]["rows"] for s in SPLITS) == 100

    trained = stage("train", spark, cfg)
    assert trained["world_size"] == 2 and trained["metrics"]["epochs"] == 1
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(trained["run_id"])
    train_table = prepared["tables"]["train"]
    assert run.data.params["table.train"] == f"{train_table['uri']}@{train_table['version']}"
    assert int(run.data.params["train.rows"]) == prepared["tables"]["train"]["rows"]
    directory = checkpoints.run_dir(cfg.train.checkpoint_uri, cfg.train.run_name, trained["run_id"])
    assert checkpoints.latest(directory) == f"{directory}/epoch-0001.pt"
    assert checkpoints.load(f"{directory}/epoch-0001.pt")["epoch"] == 1

    evaluated = stage("evaluate", spark, with_run(cfg, trained["run_id"]))
    assert evaluated["champion"]
    scored = stage("score", spark, cfg)
    out = scored["predictions"]
    assert out["uri"] == hdfs.url(f"/e2e/lake/{small.data.name}_predictions")
    assert scored["input"] == {"uri": prepared["tables"]["test"]["uri"], "version": prepared["tables"]["test"]["version"]}
    assert out["rows_appended"] == prepared["tables"]["test"]["rows"] and out["rows_rejected"] == 0
    predictions = lake.read_table(spark, out["uri"], out["version"])
    assert predictions.count() == out["rows_appended"]
    assert {r.model_version for r in predictions.select("model_version").distinct().collect()} == {
        evaluated["model_version"]}
