"""A prepare job SIGKILLed while its Spark tasks write parquet: the previous version stays the
latest and readable, no partial version exists, a rerun succeeds, and VACUUM removes the killed
job's orphan files only once they are older than the retention."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import deltalake
import pytest

from dlpipe import cli, lake
from dlpipe.refs import SPLITS
from dlpipe.stages import prepare
from dlpipe.stages.train import pinned_set

pytestmark = pytest.mark.slow

# The child runs the real `dlpipe prepare`; the only change: each Spark task, once its parquet
# file is written, holds on for a while before reporting it, so that the kill lands while the
# job's tasks are writing and before the driver commits (otherwise the window is milliseconds).
CHILD = textwrap.dedent("""
    import sys, time
    from dlpipe import cli, lake

    def write_then_hold(root, batches):
        from dlpipe import lake as executor_lake  # the executors' own copy, unpatched
        wrote = False
        for row in executor_lake._write_files(root, batches):
            wrote = True
            yield row
        if wrote:
            time.sleep(300)

    lake._write_files = write_then_hold
    sys.exit(cli.main(sys.argv[1:]))
""")


def _parquet(table_dir: Path) -> set[str]:
    return {p.name for p in table_dir.glob("*.parquet")}


@pytest.fixture(scope="module")
def killed(spark, small_landing, tmp_path_factory):
    """v0 of every table by a finished prepare, then a second prepare killed while writing the
    train table: (config, train table dir, v0's train files, the orphan files)."""
    cfg, _ = small_landing
    root = tmp_path_factory.mktemp("recovery")
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, lake=str(root / "lake")))
    first = prepare.run(spark, cfg.data, cfg.paths)
    train_dir = Path(cfg.table_uri("train"))
    v0_files = _parquet(train_dir)
    assert first["tables"]["train"]["version"] == 0 and v0_files

    script = root / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, str(script), "prepare", "--set", f"paths.landing={cfg.paths.landing}",
           "--set", f"paths.lake={cfg.paths.lake}", "--set", f"data.classes={json.dumps(cfg.data.classes)}",
           "--set", "spark.master=local[2]", "--set", "lake.engine=rs"]  # the engine whose writes the child holds
    child = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()}, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not _parquet(train_dir) - v0_files:
            assert child.poll() is None, f"prepare exited ({child.returncode}) before writing the train table"
            assert time.monotonic() < deadline, "no parquet file of the second job appeared in 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the driver, its JVM and its Python workers
        child.wait(timeout=30)
    orphans = _parquet(train_dir) - v0_files
    return cfg, train_dir, v0_files, orphans, first


def test_killed_job_leaves_previous_version_latest_and_no_partial_version(spark, killed):
    cfg, train_dir, v0_files, orphans, first = killed
    uri = cfg.table_uri("train")
    assert orphans  # the killed job's tasks did write parquet files ...
    assert lake.latest_version(uri) == 0  # ... and none of them was committed
    assert sorted(p.name for p in (train_dir / "_delta_log").glob("*.json")) == ["00000000000000000000.json"]
    assert not list((train_dir / "_delta_log").glob("*.tmp*"))
    table = deltalake.DeltaTable(uri)
    assert {Path(f).name for f in table.file_uris()} == v0_files
    assert table.to_pyarrow_table().num_rows == first["tables"]["train"]["rows"]
    assert lake.read_table(spark, uri).count() == first["tables"]["train"]["rows"]
    # jobs downstream still get one consistent set of versions: those of the finished job
    pinned, job = pinned_set({s: cfg.table_uri(s) for s in SPLITS})
    assert {s: ref.version for s, ref in pinned.items()} == {"train": 0, "val": 0, "test": 0}
    assert job == first["job_id"]


def test_rerun_succeeds_then_vacuum_removes_orphans_only_past_retention(spark, killed, capsys):
    cfg, train_dir, v0_files, orphans, first = killed
    uri = cfg.table_uri("train")
    rerun = prepare.run(spark, cfg.data, cfg.paths)
    assert rerun["tables"]["train"]["version"] == 1 and rerun["accepted"] == first["accepted"]
    latest_files = {Path(f).name for f in deltalake.DeltaTable(uri).file_uris()}
    assert latest_files.isdisjoint(v0_files | orphans)

    # a retention of 1 hour keeps everything: the orphans and v0's files are minutes old
    assert lake.vacuum(uri, 1) == []
    assert _parquet(train_dir) == v0_files | orphans | latest_files
    # the CLI's dry run lists, deletes nothing, and starts no Spark
    capsys.readouterr()
    assert cli.main(["lake", "vacuum", "--table", uri, "--retain-hours", "0", "--dry-run"]) == 0
    listed = json.loads(capsys.readouterr().out)["files_to_delete"]
    assert {Path(f).name for f in listed} == v0_files | orphans
    assert _parquet(train_dir) == v0_files | orphans | latest_files
    # retention 0: the orphans and the files only version 0 needed are gone, the latest reads
    deleted = lake.vacuum(uri, 0)
    assert {Path(f).name for f in deleted} == v0_files | orphans
    assert _parquet(train_dir) == latest_files
    assert lake.read_table(spark, uri).count() == rerun["tables"]["train"]["rows"]
    assert deltalake.DeltaTable(uri).to_pyarrow_table().num_rows == rerun["tables"]["train"]["rows"]
    assert cli.main(["lake", "history", "--table", uri]) == 0
    operations = [c["operation"] for c in json.loads(capsys.readouterr().out)["history"]]
    assert operations[-2:] == ["WRITE", "WRITE"] and "VACUUM END" in operations  # v0 and the rerun: delta-spark
