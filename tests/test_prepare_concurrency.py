"""Overlapping prepare jobs, each a real `dlpipe prepare` in its own process with its own Spark:
every file's rows are stored once, whatever the interleaving; a job that loses stops with the
one-line conflict error (exit code 6) or finds nothing left to take. Both Delta engines."""

import json
import os
import subprocess
import sys

import deltalake
import pytest
from PIL import Image

from dlpipe.errors import EXIT_CONFLICT
from tests.conftest import make_config, stage

pytestmark = pytest.mark.slow

CLASSES = ["cat", "dog"]


def _land(landing, names):
    for name in names:
        path = landing / CLASSES[int(name.split("_")[1]) % 2] / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), color=len(name) * 7 % 256).save(path, format="PNG")


def _keys(cfg):
    keys = []
    for split in ("train", "val", "test"):
        keys += deltalake.DeltaTable(cfg.table_uri(split)).to_pyarrow_table(columns=["key"]).column("key").to_pylist()
    return keys


@pytest.mark.parametrize("engine", ["spark", "rs"])
def test_two_appends_started_together_store_every_new_file_once(spark, tmp_path, engine):
    landing = tmp_path / "landing"
    _land(landing, [f"old_{i}" for i in range(40)])
    sets = [f"paths.landing={landing}", f"data.classes={json.dumps(CLASSES)}", "data.image_size=8",
            "data.channels=1", "data.name=overlap", "spark.master=local[1]", f"lake.engine={engine}"]
    cfg = make_config(tmp_path, *sets)
    assert stage("prepare", spark, cfg)["accepted"] == 40
    _land(landing, [f"new_{i}" for i in range(60)])

    cmd = [sys.executable, "-m", "dlpipe.cli", "prepare", "--set", "data.mode=append", "--set", f"paths.lake={tmp_path}/lake"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    jobs = [subprocess.Popen(cmd + ["--summary", str(tmp_path / f"job{i}.json")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(job.wait(timeout=600), *job.communicate()) for job in jobs]

    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, EXIT_CONFLICT]), [(c, [x for x in err.splitlines() if "Exception" in x or "rror" in x][:5])
                                                    for c, _, err in results]
    for code, _, err in results:
        if code == EXIT_CONFLICT:
            last = err.strip().splitlines()[-1]
            assert last.startswith("dlpipe: error: Delta table ") and "another job wrote to it meanwhile" in last
            assert "Traceback" not in err
    keys = _keys(cfg)
    assert len(keys) == len(set(keys)) == 100  # every file stored, none twice
    sources = deltalake.DeltaTable(cfg.table_uri("sources")).to_pyarrow_table().column("source").to_pylist()
    assert len(sources) == len(set(sources)) == 100
    taken = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(2) if (tmp_path / f"job{i}.json").exists()]
    assert sum(s["accepted"] for s in taken) == 60  # the winner took all 60; a later job found nothing new
    # a third run takes nothing
    again = stage("prepare", spark, make_config(tmp_path, *sets, "data.mode=append"))
    assert again["input_files"] == 0 and len(_keys(cfg)) == 100
