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
