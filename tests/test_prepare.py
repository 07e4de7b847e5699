"""The prepare job on a landing zone with planted bad files: counts reconcile, reasons are kept,
too many rejects write nothing, and a job that dies half-way is never mixed into a training set."""

import deltalake
import pytest
from PIL import Image

from dlpipe import lake
from dlpipe.refs import SPLITS
from dlpipe.stages.train import pinned_set
from tests.conftest import make_config, stage

CLASSES = ["cat", "dog"]


def _landing(root, good=16):
    for i in range(good):
        path = root / "landing" / CLASSES[i % 2] / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (6, 6), color=i * 10).save(path)
    (root / "landing" / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "landing" / "dog" / "empty.png").write_bytes(b"")


def _config(root, *overrides):
    return make_config(root, f"paths.landing={root}/landing", "data.name=pets", f"data.classes={CLASSES}",
                       "data.image_size=4", "data.split_fractions={train: 0.5, val: 0.25, test: 0.25}", *overrides)


def test_counts_reconcile_and_reasons_are_kept(spark, tmp_path):
    _landing(tmp_path)
    summary = stage("prepare", spark, _config(tmp_path, "data.max_rejected_fraction=0.2"))
    assert summary["input_files"] == 18 == summary["accepted"] + summary["rejected"]
    assert summary["rejected"] == 2
    assert sum(summary["tables"][s]["rows"] for s in SPLITS) == 16
    rejected = deltalake.DeltaTable(summary["tables"]["rejected"]["uri"]).to_pandas().set_index("key")["reason"]
    assert rejected["cat/corrupt.png"].startswith("cannot decode image")
    assert rejected["dog/empty.png"] == "empty file"


def test_too_many_rejects_fail_and_write_no_new_version(spark, tmp_path):
    _landing(tmp_path)
    cfg = _config(tmp_path, "data.max_rejected_fraction=0.2")
    first = stage("prepare", spark, cfg)
    for i in range(3):  # now 5 bad files of 21: 24% > 20%
        (tmp_path / "landing" / "dog" / f"bad_{i}.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"5 of 21 files .* were rejected \(23.8%\), more than data.max_rejected_fraction=0.2; "
                                         r"no new version .* most common: 3 x cannot decode image: UnidentifiedImageError: not an image format"):
        stage("prepare", spark, cfg)
    for split in SPLITS:
        assert lake.latest_version(cfg.table_uri(split)) == first["tables"][split]["version"]
    assert lake.latest_version(cfg.table_uri("rejected")) == first["tables"]["rejected"]["version"] + 1


def _dies_after_the_train_table(spark, cfg, monkeypatch):
    """A prepare job that loses its executor writing the val table, after committing train."""
    write = lake.write_table

    def dies_on_val(df, uri, **kwargs):
        if uri.endswith("_val"):
            raise RuntimeError("executor lost")
        return write(df, uri, **kwargs)

    monkeypatch.setattr(lake, "write_table", dies_on_val)
    with pytest.raises(RuntimeError, match="executor lost"):
        stage("prepare", spark, cfg)


def test_a_job_that_died_half_way_is_not_pinned(spark, tmp_path, monkeypatch):
    _landing(tmp_path)
    cfg = _config(tmp_path, "data.max_rejected_fraction=0.2")
    first = stage("prepare", spark, cfg)
    _dies_after_the_train_table(spark, cfg, monkeypatch)
    assert lake.latest_version(cfg.table_uri("train")) == first["tables"]["train"]["version"] + 1  # half-written job
    pinned, job = pinned_set({s: cfg.table_uri(s) for s in SPLITS})
    assert {s: pinned[s].version for s in SPLITS} == {s: first["tables"][s]["version"] for s in SPLITS}
    assert job == first["job_id"]


def test_new_files_arrive_and_no_existing_key_moves(spark, tmp_path):
    """Through the prepare job itself: a second job over the landing zone with new files puts
    every key it saw before in the same table, and the new files spread over all three."""
    _landing(tmp_path, good=40)
    cfg = _config(tmp_path, "data.max_rejected_fraction=0.2")
    first = stage("prepare", spark, cfg)
    before = {s: set(lake.read_table(spark, first["tables"][s]["uri"], first["tables"][s]["version"])
                     .toPandas()["key"]) for s in SPLITS}
    for i in range(40, 100):
        path = tmp_path / "landing" / CLASSES[i % 2] / f"new_{i:03d}.png"
        Image.new("L", (6, 6), color=i).save(path)
    second = stage("prepare", spark, cfg)
    after = {s: set(lake.read_table(spark, second["tables"][s]["uri"], second["tables"][s]["version"])
                    .toPandas()["key"]) for s in SPLITS}
    for split in SPLITS:
        assert before[split] <= after[split], f"keys left {split}: {before[split] - after[split]}"
    assert sum(len(k) for k in after.values()) == 100
    assert all(any(k.split("/")[1].startswith("new_") for k in after[s]) for s in SPLITS)


def test_a_file_that_vanishes_after_the_listing_is_counted_not_lost(spark, tmp_path, monkeypatch):
    """The listing is the job's own count of its input: a file deleted between the listing and
    the read becomes a rejected row with the reason, and listed = accepted + rejected."""
    from dlpipe.stages import prepare

    _landing(tmp_path)
    listed = prepare.list_files

    def list_then_delete(uri):
        files = listed(uri)
        (tmp_path / "landing" / "cat" / "img_000.png").unlink()  # gone before any task reads it
        return files

    monkeypatch.setattr(prepare, "list_files", list_then_delete)
    summary = stage("prepare", spark, _config(tmp_path, "data.max_rejected_fraction=0.2"))
    assert summary["listed_files"] == summary["input_files"] == 18 == summary["accepted"] + summary["rejected"]
    assert (summary["accepted"], summary["rejected"]) == (15, 3)
    rejected = deltalake.DeltaTable(summary["tables"]["rejected"]["uri"]).to_pandas().set_index("key")["reason"]
    assert rejected["cat/img_000.png"].startswith("cannot read file (listed, then not readable")


def test_append_after_a_job_died_half_way_stores_the_rest_once(spark, tmp_path, monkeypatch):
    """An append that died after committing the train table but before the sources: the rerun
    takes the same files again, stores what is missing and does not store the train rows twice."""
    _landing(tmp_path, good=40)
    cfg = _config(tmp_path, "data.max_rejected_fraction=0.2", "data.mode=append")
    first = stage("prepare", spark, cfg)
    for i in range(40, 60):
        path = tmp_path / "landing" / CLASSES[i % 2] / f"img_{i:03d}.png"
        Image.new("L", (6, 6), color=i).save(path)
    _dies_after_the_train_table(spark, cfg, monkeypatch)
    monkeypatch.undo()
    rerun = stage("prepare", spark, cfg)
    assert rerun["input_files"] == 20 and rerun["already_stored"] > 0
    assert rerun["accepted"] + rerun["already_stored"] == 20 and rerun["rejected"] == 0
    keys = [k for s in SPLITS for k in deltalake.DeltaTable(cfg.table_uri(s)).to_pandas()["key"]]
    assert len(keys) == len(set(keys)) == first["accepted"] + 20


@pytest.mark.parametrize("given", [None, "3"])
def test_the_table_writes_scan_the_staged_rows_in_four_tasks_per_core_and_a_given_value_wins(spark, tmp_path,
                                                                                              monkeypatch, given):
    """While prepare writes, Spark cuts the staged files into 4 scan tasks per core (3 tasks on 2
    cores left one core idle for a third of each write); the session is left as it was, and a
    value the user set (spark-submit --conf) is kept."""
    key, seen, write = "spark.sql.files.minPartitionNum", [], lake.write_table
    monkeypatch.setattr(lake, "write_table", lambda df, uri, **kw: seen.append(spark.conf.get(key, None)) or write(df, uri, **kw))
    _landing(tmp_path)
    if given:
        spark.conf.set(key, given)
    try:
        stage("prepare", spark, _config(tmp_path, "data.max_rejected_fraction=0.2"))
        assert seen and set(seen) == {given or str(4 * spark.sparkContext.defaultParallelism)}
        assert spark.conf.get(key, None) == given
    finally:
        spark.conf.unset(key)


def _grey(key: str) -> float:
    """The grey level _landing gave an image, in [0, 1]: img_<i> is i * 10 out of 255."""
    return int(key.rsplit("_", 1)[1][:3]) * 10 / 255


def test_pixels_are_stored_as_bytes_and_every_reader_gets_floats_in_0_1(spark, tmp_path):
    """The tables hold each image as its decoded bytes (dlpipe.tensors); Spark's reader
    (lake.read_table), the training loader and the driver's Arrow readers give the same floats."""
    from dlpipe import tensors
    from dlpipe.worker import load_shard

    _landing(tmp_path)
    summary = stage("prepare", spark, _config(tmp_path, "data.max_rejected_fraction=0.2"))
    train = summary["tables"]["train"]
    stored = lake.read_table(spark, train["uri"], train["version"], stored=True)
    assert dict(stored.dtypes)["pixels"] == "binary"
    assert {len(r["pixels"]) for r in stored.collect()} == {16}  # 4 x 4 x 1 bytes
    floats = lake.read_table(spark, train["uri"], train["version"])
    assert dict(floats.dtypes)["pixels"] == "array<float>"
    rows = floats.select("key", "pixels").collect()
    for r in rows:
        assert r["pixels"] == pytest.approx([_grey(r["key"])] * 16, abs=1e-7), r["key"]
    x, _ = load_shard(lake.table_files(train["uri"], train["version"]), (1, 4, 4), 0, 1)
    assert sorted(x[:, 0, 0, 0].tolist()) == pytest.approx(sorted(_grey(r["key"]) for r in rows), abs=1e-7)
    arrow = lake.read_columns(train["uri"], train["version"], ["key", "pixels"])
    driver = tensors.matrix(arrow.column("pixels"), "pixels")
    assert driver.shape == (len(rows), 16) and driver.dtype == "float32"
    assert driver[:, 5].tolist() == pytest.approx([_grey(k) for k in arrow.column("key").to_pylist()], abs=1e-7)


def test_append_to_tables_of_float_arrays_keeps_their_arrays(spark, tmp_path):
    """A lake written before pixels were stored as bytes (pixels array<float>) takes new files in
    append mode in its own format, and every row reads back as before."""
    import shutil

    _landing(tmp_path, good=12)
    cfg = _config(tmp_path, "data.max_rejected_fraction=0.3")
    first = stage("prepare", spark, cfg)
    for split in SPLITS:  # the older format: the same rows, pixels as float arrays
        uri = first["tables"][split]["uri"]
        old = lake.read_table(spark, uri, first["tables"][split]["version"]).toPandas()
        shutil.rmtree(uri)
        lake.write_table(spark.createDataFrame(old, "key string, source string, label int, label_name string, "
                                                    "pixels array<float>, height int, width int, channels int"), uri)
    for i in range(12, 26):  # grey levels up to 250
        path = tmp_path / "landing" / CLASSES[i % 2] / f"img_{i:03d}.png"
        Image.new("L", (6, 6), color=i * 10).save(path)
    second = stage("prepare", spark, _config(tmp_path, "data.max_rejected_fraction=0.3", "data.mode=append"))
    assert second["input_files"] == 14 and second["accepted"] == 14
    keys = set()
    for split in SPLITS:
        table = second["tables"][split]
        assert dict(lake.read_table(spark, table["uri"], table["version"], stored=True).dtypes)["pixels"] == "array<float>"
        for r in lake.read_table(spark, table["uri"], table["version"]).select("key", "pixels").collect():
            assert r["pixels"] == pytest.approx([_grey(r["key"])] * 16, abs=1e-7), r["key"]
            keys.add(r["key"])
    assert len(keys) == 26


def test_the_staging_tasks_write_each_split_apart_and_each_table_reads_only_its_own(spark, tmp_path, monkeypatch):
    """The images parser gives each row its split: the staging tasks write accepted/<split>/, every
    row there is of that split, and each table write reads only its own split's files."""
    import pyarrow.parquet as pq

    from dlpipe.stages import prepare
    from pipelines import sources

    _landing(tmp_path, good=40)
    staged, reads = {}, []
    stage_parsed, read_parquet = sources.stage_parsed, lake.read_parquet
    monkeypatch.setattr(prepare, "stage_parsed", lambda *a: staged.update(stage_parsed(*a)) or staged)
    monkeypatch.setattr(lake, "read_parquet", lambda spark, files, schema: reads.append(list(files)) or read_parquet(spark, files, schema))
    monkeypatch.setattr(prepare, "_remove", lambda uri: None)  # keep the staged files to look at
    summary = stage("prepare", spark, _config(tmp_path, "data.max_rejected_fraction=0.2"))
    for split in SPLITS:
        files = staged[f"accepted/{split}"]
        assert files and all(f in staged["accepted"] for f in files)
        assert {v for f in files for v in pq.read_table(f.removeprefix("file:"), columns=["split"]).column("split").to_pylist()} == {split}
        assert files in reads  # the table write read this split's files alone
        assert summary["tables"][split]["rows"] == sum(pq.ParquetFile(f.removeprefix("file:")).metadata.num_rows for f in files)
    assert sorted(f for s in SPLITS for f in staged[f"accepted/{s}"]) == sorted(staged["accepted"])
