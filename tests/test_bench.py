"""The training benchmark runs end to end on a small slice and reports every figure (the figures
themselves are for the README table, not asserted)."""

import dataclasses

import pytest

from benchmarks import ray_peer, training

pytestmark = pytest.mark.slow


def test_bench_training_reports_every_run_and_ratio(spark, prepared_small):
    cfg, _ = prepared_small
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, batch_size=8))
    summary = training.run(spark, cfg)
    ray = ray_peer.available()  # the peer runs where Ray Train is installed (not by `make setup`), and says so where not
    assert set(summary["runs"]) == {"a_bare_pytorch_1_process", "b_dlpipe_local", "c_horovod_2_workers",
                                    "d_torch_distributor_2_workers", "e_horovod_average_k8_2_workers",
                                    "f_no_communication_2_workers"} | ({"g_ray_torch_trainer_2_workers"} if ray else set())
    assert (summary["peer_ray_samples_per_s"] is not None) == ray == ("horovod_over_ray" in summary["ratios"])
    for name, run in summary["runs"].items():
        assert run["samples_per_sec"] > 0 and 0 <= run["test_accuracy"] <= 1, name
    assert summary["runs"]["c_horovod_2_workers"]["world_size"] == 2
    assert summary["ratios"]["local_over_bare"] > 0 and summary["ratios"]["horovod_2_over_2x_bare"] > 0
    top = summary["runs"]["f_no_communication_2_workers"]["samples_per_sec"]
    assert summary["ratios"]["comm_efficiency_horovod"] == summary["runs"]["c_horovod_2_workers"]["samples_per_sec"] / top


def test_bench_elastic_kills_a_worker_and_reports_what_it_cost(prepared_small, tmp_path):
    """`dlpipe bench elastic` as a user runs it (its own Spark, local[2,4]), 40 short epochs of the slice."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import read_table
    from tests.test_drills import cli_args

    cfg, prepared = prepared_small
    out = tmp_path / "bench-elastic.json"
    done = subprocess.run([sys.executable, "-m", "dlpipe.cli", "bench", "elastic", *cli_args(cfg), "--set", "spark.master=local[2,4]",
                           "--set", "train.epochs=40", "--set", "train.batch_size=4", "--set", "train.commit_every=5",
                           "--summary", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "killed worker rank 1" in done.stdout
    summary = json.loads(out.read_text())
    assert summary["time_lost_s"] == summary["interrupted"]["train_wall_s"] - summary["uninterrupted"]["train_wall_s"]
    assert summary["accuracy_delta"] == summary["interrupted"]["test_accuracy"] - summary["uninterrupted"]["test_accuracy"]
    assert summary["epoch_s"] > 0 and summary["cores"] and summary["load_average_before"] is not None
    rows = len(read_table(prepared, "train"))
    assert summary["interrupted"]["train_rows"] == rows
    assert len(summary["interrupted"]["epoch_samples"]) == 40
    assert all(rows - 2 * 4 < s <= rows for s in summary["interrupted"]["epoch_samples"])
