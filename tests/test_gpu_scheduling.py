"""GPU scheduling on CPU: fake GPUs through a resource discovery script on `local-cluster`, the
way Spark's own TorchDistributor tests do."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    from pyspark import TaskContext
    from dlpipe.launchers import task_slots
    from dlpipe.spark import get_session

    discovery, gpus_per_executor = sys.argv[1], sys.argv[2]
    spark = get_session("local-cluster[2,2,1024]", "fake-gpus", {
        "spark.worker.resource.gpu.amount": gpus_per_executor,
        "spark.worker.resource.gpu.discoveryScript": discovery,
        "spark.executor.resource.gpu.amount": gpus_per_executor,
        "spark.task.resource.gpu.amount": "1",
        "spark.ui.enabled": "false",
    })
    spark.range(8, numPartitions=4).count()  # executors have registered
    slots = task_slots(spark)

    def gpu_of_task(_):
        yield (TaskContext.get().resources()["gpu"].addresses, TaskContext.get().partitionId())

    seen = spark.sparkContext.parallelize(range(slots), slots).barrier().mapPartitions(gpu_of_task).collect()
    print(json.dumps({"slots": slots, "default_parallelism": spark.sparkContext.defaultParallelism, "tasks": seen}))
    spark.stop()
""")


@pytest.mark.parametrize("gpus_per_executor, expected_slots", [("1", 2), ("2", 4)])
def test_slots_follow_fake_gpus_on_local_cluster(tmp_path, gpus_per_executor, expected_slots):
    discovery = tmp_path / "gpus.sh"
    addresses = [str(i) for i in range(int(gpus_per_executor))]
    discovery.write_text(f"#!/usr/bin/env bash\necho '{json.dumps({'name': 'gpu', 'addresses': addresses})}'\n")
    discovery.chmod(0o755)
    script = tmp_path / "gpus.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(discovery), gpus_per_executor],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["default_parallelism"] == 4  # 2 executors x 2 cores
    assert out["slots"] == expected_slots  # GPUs, not cores, bound the workers when tasks ask for GPUs
    assert len(out["tasks"]) == expected_slots
    assert all(len(addresses) == 1 for addresses, _ in out["tasks"])  # one GPU per barrier task
