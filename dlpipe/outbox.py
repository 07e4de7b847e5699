"""A training run whose MLflow tracking server goes away part-way through.

MLflow's HTTP client already retries each call (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default:
about 4 minutes). What dlpipe adds for a longer outage:

- rank 0 sends its epoch records from a background thread (Sender), so training never waits on the
  server; what the server does not take stays queued, goes with the next epoch's, and at the end
  travels with the worker's result to the driver;
- the driver runs the training run in `run_or_defer`: when the server still does not answer after
  MLflow's retries, the run's end status and every record not delivered are written to the outbox
  (<train.checkpoint_uri>/outbox/<run id>.json) and the step stops with TrackingUnreachable (exit 5);
- the next `dlpipe train` against the same tracking store delivers the outbox first (`deliver`): the
  records, then the status (FAILED), so no run stays RUNNING; with train.resume=auto it then goes on
  with that run from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

from pyarrow import fs

from dlpipe.errors import TrackingUnreachable
from dlpipe.storage import filesystem, join

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch


def unreachable(exc: BaseException) -> bool:
    """True for the error of a tracking server that did not answer (refused, reset, timed out, or kept
    answering 5xx) after MLflow's own retries; False for an answer that refused the request."""
    import requests

    seen = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if any(s in str(seen) for s in ("Max retries exceeded", "Connection refused", "Connection aborted")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def metric(key: str, value: float, step: int) -> list:
    """One epoch record: [kind, key, value, timestamp in ms, step] (JSON as it is)."""
    return ["metric", key, float(value), int(time.time() * 1000), int(step)]


def text(body: str, artifact_path: str) -> list:
    return ["text", body, artifact_path]


def send(client, run_id: str, records: list, sent=lambda n: None) -> None:
    """Log `records` to the run in order (consecutive metrics in one batch); `sent(n)` after each
    call the server took, so a failure part-way leaves only the rest to send again."""
    from mlflow.entities import Metric

    i = 0
    while i < len(records):
        j = i + 1
        if records[i][0] == "metric":
            while j < len(records) and records[j][0] == "metric" and j - i < MAX_METRICS_PER_BATCH:
                j += 1
            client.log_batch(run_id, metrics=[Metric(r[1], r[2], r[3], r[4]) for r in records[i:j]])
        else:
            client.log_text(run_id, records[i][1], records[i][2])
        sent(j - i)
        i = j


def flush(client, run_id: str, pending: list) -> None:
    """send() the records of `pending`, removing each from it once the server took it."""
    send(client, run_id, list(pending), sent=lambda n: pending.__delitem__(slice(0, n)))


class Sender:
    """Rank 0's epoch records, sent by a background thread: training never waits on the server. A
    record the server does not take is kept and sent again with the next; close() tries once more
    and returns what is still unsent, for the driver."""

    def __init__(self, tracking_uri: str, run_id: str, log=print):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.log = MlflowClient(tracking_uri), run_id, log
        self.pending: list = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closing = False
        self.failing = False  # the last try failed (said once per outage)
        self.thread = threading.Thread(target=self._loop, name="dlpipe-mlflow-sender", daemon=True)
        self.thread.start()

    def put(self, records: list) -> None:
        with self.lock:
            self.pending.extend(records)
        self.wake.set()

    def close(self) -> list:
        self.closing = True
        self.wake.set()
        self.thread.join()
        return list(self.pending)

    def _loop(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            last = self.closing  # read before the try: a close() after it wakes one more
            self._flush()
            if last:
                return

    def _flush(self) -> None:
        with self.lock:
            records = list(self.pending)
        if not records:
            return
        try:
            send(self.client, self.run_id, records, sent=self._drop)
        except Exception as exc:  # noqa: BLE001 - kept and retried; the driver decides in the end
            if not self.failing:
                self.log(f"dlpipe: the MLflow tracking server did not take {len(self.pending)} epoch record(s) "
                         f"({_first_line(exc)}); training goes on, they are kept and sent again")
            self.failing = True
            return
        if self.failing:
            self.log("dlpipe: the MLflow tracking server answers again; the kept epoch records are sent")
        self.failing = False

    def _drop(self, n: int) -> None:
        with self.lock:
            del self.pending[:n]


@contextlib.contextmanager
def _one_try():
    """MLflow calls inside try once and give up within 10 s (the server was already found away)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def run_or_defer(outbox_uri: str, tracking_uri: str, pending: list, **start_run):
    """mlflow.start_run(**start_run) as a context whose run always gets an end: FINISHED, or FAILED
    with the error re-raised; when the tracking server stops answering (after MLflow's retries), the
    end and the records in `pending` (epoch records not yet delivered; the caller empties it as it
    sends them) go to the outbox and the step stops with TrackingUnreachable."""
    import mlflow

    active = mlflow.start_run(**start_run)
    run_id = active.info.run_id
    try:
        yield active
    except BaseException as exc:
        if not unreachable(exc):
            with contextlib.suppress(Exception):  # the original error matters more than its run's status
                _end(mlflow, "FAILED", outbox_uri, tracking_uri, run_id, pending)
            raise
        with _one_try(), contextlib.suppress(Exception):
            mlflow.end_run("FAILED")  # off MLflow's stack of active runs; the server is away, most likely
        where = defer(outbox_uri, tracking_uri, run_id, "FAILED", pending)
        raise TrackingUnreachable(
            f"the MLflow tracking server {tracking_uri} stopped answering during run {run_id} ({_first_line(exc)}); "
            f"its end (FAILED) and {len(pending)} epoch record(s) are kept in {where}, delivered by the next "
            "`dlpipe train` on this store (which, with train.resume=auto, continues the run from its last checkpoint)") from None
    _end(mlflow, "FINISHED", outbox_uri, tracking_uri, run_id, pending)


def _end(mlflow, status: str, outbox_uri: str, tracking_uri: str, run_id: str, pending: list) -> None:
    try:
        mlflow.end_run(status)
    except Exception as exc:
        if not unreachable(exc):
            raise
        where = defer(outbox_uri, tracking_uri, run_id, status, pending)
        raise TrackingUnreachable(f"the MLflow tracking server {tracking_uri} stopped answering as run {run_id} ended "
                                  f"({_first_line(exc)}); its end ({status}) is kept in {where}, delivered by the next "
                                  "`dlpipe train` on this store") from None


def defer(outbox_uri: str, tracking_uri: str, run_id: str, status: str, records: list) -> str:
    """Write (atomically) what the run still owes the server; returns the file's URI."""
    filesys, path = filesystem(outbox_uri)
    filesys.create_dir(path, recursive=True)
    entry = {"tracking_uri": tracking_uri, "run_id": run_id, "status": status, "records": records,
             "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with filesys.open_output_stream(f"{path}/.{run_id}.json.tmp") as out:
        out.write(json.dumps(entry).encode())
    filesys.move(f"{path}/.{run_id}.json.tmp", f"{path}/{run_id}.json")
    return join(outbox_uri, f"{run_id}.json")


def deliver(outbox_uri: str, tracking_uri: str, log=print) -> list[str]:
    """Send what the outbox holds for this tracking store: each run's records, then its end status
    (only if the run is still RUNNING: a run resumed and finished since keeps its own); the entry is
    removed once delivered. Returns the run ids delivered."""
    from mlflow.tracking import MlflowClient

    filesys, path = filesystem(outbox_uri)
    delivered = []
    for info in filesys.get_file_info(fs.FileSelector(path, allow_not_found=True)):
        if not (info.base_name.endswith(".json") and not info.base_name.startswith(".")):
            continue
        with filesys.open_input_stream(info.path) as f:
            entry = json.loads(f.read())
        if entry["tracking_uri"] != tracking_uri:
            continue
        client = MlflowClient(tracking_uri)
        send(client, entry["run_id"], entry["records"])
        if client.get_run(entry["run_id"]).info.status == "RUNNING":
            client.set_terminated(entry["run_id"], entry["status"])
        filesys.delete_file(info.path)
        delivered.append(entry["run_id"])
        log(f"dlpipe: delivered the outbox of run {entry['run_id']} ({len(entry['records'])} epoch record(s), "
            f"kept since {entry['written']}); the run is {client.get_run(entry['run_id']).info.status}")
    return delivered


def _first_line(exc: BaseException) -> str:
    """The reason in a few words: MLflow's message of a failed request repeats its whole URL."""
    message = str(exc)
    known = next((s for s in ("Connection refused", "Connection aborted", "Read timed out", "too many 5") if s in message), None)
    return f"{type(exc).__name__}: " + (known or (message.strip().splitlines() or [""])[0][:200])
