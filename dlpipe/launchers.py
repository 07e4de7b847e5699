"""Launchers: how the one training function (dlpipe.worker.train_worker) is started on N workers.
A launcher is one small protocol, chosen by `train.backend` in one place (LAUNCHERS):

    check()                               -> raises ConfigError naming train.backend and the fix
    run(spark, task, num_workers) -> list    the workers' results (rank 0's is not None)

in-process (`local`), Horovod on the job's Spark executors (`horovod`), TorchDistributor
(`torch_distributor`: torch.distributed, Gloo on CPU, NCCL on GPU), and one worker in one Spark
task (`spark_task`: how `dlpipe tune` runs many small trials at once). There is no fallback: a
launcher that cannot run is an error before Spark starts (the CLI calls check_backend), not a
quieter run with fewer workers."""

from __future__ import annotations

import dataclasses
import gc
import re
import tempfile
import threading
import time
import uuid
from typing import Protocol

from pyarrow import fs

from dlpipe.errors import ConfigError, WorkersLost
from dlpipe.storage import filesystem, join
from dlpipe.worker import TrainTask, load_shard, train_worker

__all__ = ["LAUNCHERS", "TrainTask", "WorkerError", "check_backend", "launch", "load_shard", "task_slots"]


class WorkerError(RuntimeError):
    """A training worker raised; the message names its rank and the exception."""


class Launcher(Protocol):
    name: str
    distributed: bool  # runs one worker per Spark task (needs that many task slots)

    def check(self) -> None:
        """Raise ConfigError (naming train.backend and the fix) when this launcher cannot run here."""

    def run(self, spark, task: TrainTask, num_workers: int) -> list:
        """train_worker(task, name) on every worker; their return values."""


class InProcess:
    name, distributed = "local", False

    def check(self) -> None:
        pass

    def run(self, spark, task: TrainTask, num_workers: int) -> list:
        return [train_worker(task, self.name)]


class HorovodOnSpark:
    name, distributed = "horovod", True

    def check(self) -> None:
        try:
            import horovod.spark  # noqa: F401
            import horovod.torch  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"config key 'train.backend': horovod, but Horovod is not importable ({exc}); install it "
                              "with `bash deploy/install_horovod.sh .venv` (`make setup` does), or set "
                              "train.backend=torch_distributor or local") from None

    def run(self, spark, task: TrainTask, num_workers: int) -> list:
        import horovod.spark

        if not task.train.elastic:
            return horovod.spark.run(train_worker, args=(task, self.name), num_proc=num_workers, use_gloo=True, use_mpi=False)
        sc, train = spark.sparkContext, task.train
        if task_attempts(sc) < 2:
            raise ConfigError(f"config key 'train.elastic': Spark gives a lost task no second attempt under --master "
                              f"{sc.master}, so a lost worker would end the job; use local[N,F] with F >= 2 (e.g. "
                              "local[2,4]) or, on a cluster, spark.task.maxFailures >= 2")
        least = train.min_workers or num_workers
        with _Watchdog(sc, grace_s=30):
            try:
                return horovod.spark.run_elastic(
                    train_worker, args=(task, self.name), num_proc=num_workers, min_num_proc=least,
                    max_num_proc=train.max_workers or num_workers, elastic_timeout=train.elastic_timeout_s, verbose=0)
            except Exception as exc:
                if _failure_cause(task.error_dir) is not None:
                    raise  # a worker's own error: launch names its rank
                raise WorkersLost(f"elastic training stopped: workers were lost and fewer than train.min_workers={least} "
                                  f"came back (Spark's attempts for a task, spark.task.maxFailures, used up, or none "
                                  f"within train.elastic_timeout_s={train.elastic_timeout_s}); rerun to continue from the "
                                  "last checkpoint (train.resume: auto)") from exc


def task_attempts(sc) -> int:
    """How many times Spark runs a task before it fails the job: local[N,F] says F (local[N] means 1);
    elsewhere spark.task.maxFailures (default 4)."""
    local = re.fullmatch(r"local(?:\[[^,\]]+(?:,(\d+))?\])?", sc.master)
    if local:
        return int(local.group(1) or 1)
    return int(sc.getConf().get("spark.task.maxFailures", "4"))


class _Watchdog:
    """Turns Horovod 0.28's hang into a failure. When fewer than min_workers are left after Spark
    failed the job (a task out of attempts), Horovod's elastic driver stops, but the thread that
    recorded the last worker's exit waits forever at a barrier of the stopped driver, and
    run_elastic with it. Once no Spark job has run for `grace_s` while run_elastic still waits,
    those barriers are broken: run_elastic then raises and the run fails (resume: auto continues it
    from its last checkpoint)."""

    def __init__(self, sc, grace_s: float):
        self.sc, self.grace_s, self.done = sc, grace_s, threading.Event()

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="dlpipe-elastic-watchdog").start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self) -> None:
        seen = idle_since = None
        while not self.done.wait(2.0):
            active = bool(self.sc.statusTracker().getActiveJobsIds())
            seen = seen or active
            idle_since = None if active else idle_since or time.monotonic()
            if seen and idle_since and time.monotonic() - idle_since > self.grace_s:
                from horovod.runner.elastic.registration import WorkerStateRegistry

                for registry in (o for o in gc.get_objects() if isinstance(o, WorkerStateRegistry)):
                    if registry._driver.finished():
                        registry._barrier.abort()
                idle_since = time.monotonic()


class TorchDistributorOnSpark:
    name, distributed = "torch_distributor", True

    def check(self) -> None:
        pass  # part of pyspark

    def run(self, spark, task: TrainTask, num_workers: int) -> list:
        from pyspark.ml.torch.distributor import TorchDistributor

        gpus = spark.conf.get("spark.task.resource.gpu.amount", None) is not None
        use_gpu = task.train.use_gpu is True or (task.train.use_gpu == "auto" and gpus)
        return [TorchDistributor(num_processes=num_workers, local_mode=False, use_gpu=use_gpu)
                .run(train_worker, task, self.name)]


class InSparkTask:
    """One worker in one Spark task (spark.task.cpus cores): a tuning trial among many at once. A task
    lost without a report from the worker (its process killed, its executor gone) is run once more."""

    name, distributed = "spark_task", False

    def check(self) -> None:
        pass

    def run(self, spark, task: TrainTask, num_workers: int) -> list:
        job = spark.sparkContext.parallelize([0], 1)
        try:
            return job.map(lambda _: train_worker(task, "local")).collect()
        except Exception as exc:
            if _failure_cause(task.error_dir) is not None:
                raise
            print(f"dlpipe: a training task was lost ({type(exc).__name__}); running it once more", flush=True)
            return job.map(lambda _: train_worker(task, "local")).collect()


LAUNCHERS: dict[str, Launcher] = {launcher.name: launcher for launcher in
                                  (HorovodOnSpark(), TorchDistributorOnSpark(), InProcess(), InSparkTask())}
BACKENDS = ("horovod", "torch_distributor", "local")  # what train.backend may name; spark_task is tune's


def check_backend(backend: str) -> Launcher:
    """The launcher train.backend names, after checking it can run here."""
    if backend not in LAUNCHERS:
        raise ConfigError(f"config key 'train.backend': expected one of {list(BACKENDS)}, got {backend!r}")
    launcher = LAUNCHERS[backend]
    launcher.check()
    return launcher


def task_slots(spark) -> int:
    """How many tasks the application can run at once: by cores (spark.task.cpus each) and, when
    tasks ask for GPUs (spark.task.resource.gpu.amount), by the GPUs of the executors."""
    sc = spark.sparkContext
    conf = sc.getConf()
    slots = sc.defaultParallelism // int(conf.get("spark.task.cpus", "1"))
    gpus_per_task = float(conf.get("spark.task.resource.gpu.amount", "0"))
    if gpus_per_task > 0 and not sc.master.startswith("local["):
        executors = len(sc._jsc.sc().statusTracker().getExecutorInfos()) - 1  # minus the driver
        gpus_per_executor = float(conf.get("spark.executor.resource.gpu.amount", "0"))
        if executors > 0:  # none registered yet (dynamic allocation): Spark itself will wait
            slots = min(slots, executors * int(gpus_per_executor // gpus_per_task))
    return slots


def launch(spark, task: TrainTask, backend: str, num_workers: int) -> dict:
    """train_worker on `num_workers` workers (one per Spark task), or in this process; rank 0's
    result with the backend that ran it."""
    launcher = check_backend(backend)
    if launcher.distributed:
        slots = task_slots(spark)
        if num_workers > slots:
            raise RuntimeError(f"train.num_workers={num_workers} needs {num_workers} concurrent Spark task slots; "
                               f"this Spark application has {slots}")
    # created only by a worker that fails; on a cluster only shared storage (the checkpoint URI) is seen by all
    errors = join(task.checkpoint_dir or tempfile.gettempdir(), "errors", f"dlpipe-{uuid.uuid4().hex}")
    task = dataclasses.replace(task, error_dir=errors)
    try:
        results = launcher.run(spark, task, num_workers)
    except Exception as exc:
        cause = _failure_cause(errors)
        if cause is None:
            raise
        raise WorkerError(f"training failed on worker rank {cause}") from exc
    return next(r for r in results if r is not None) | {"backend": launcher.name}


def _failure_cause(error_dir: str) -> str | None:
    """The report of the worker that failed first: the others fail in their next collective
    because it left ("Horovod has been shut down", "Connection closed by peer")."""
    filesys, path = filesystem(error_dir)
    reports = []
    for info in filesys.get_file_info(fs.FileSelector(path, allow_not_found=True)):
        with filesys.open_input_stream(info.path) as f:
            reports.append((info.mtime_ns or 0, f.read().decode()))
    if not reports:
        return None
    reports.sort()
    return next((r for _, r in reports if not re.search(r"shut down|Connection closed|closed by peer", r.splitlines()[0])), reports[0][1])


