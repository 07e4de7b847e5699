"""What runs on every training worker, whichever launcher started it: connect to the others
(Horovod, torch.distributed or none), read this rank's shard of the pinned snapshot, run the one
loop (dl.train.fit), and on the main rank log epochs to MLflow, write checkpoints and return the
weights. A failing worker leaves a report naming its rank for the driver."""

from __future__ import annotations

import os
import sys
import traceback
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dl.models import Net, build
from dl.train import SingleProcess, TrainConfig, fit
from dlpipe import checkpoints, outbox, tensors
from dlpipe.storage import filesystem


@dataclass(frozen=True, kw_only=True)
class TrainTask:
    """Everything a worker needs, small enough to ship to executors (file URIs, not data)."""

    net: Net  # which registered model, its hyperparameters, input shape, outputs and task
    train: TrainConfig  # the `train:` section: what the loop does (and train.max_rows, train.use_gpu)
    train_files: list[str]
    val_files: list[str]
    tracking_uri: str = ""
    run_id: str = ""  # MLflow run the main rank logs epoch metrics to ("" = none)
    threads: int = 1
    checkpoint_dir: str = ""  # where the main rank writes checkpoints ("" = none)
    resume_from: str = ""  # checkpoint URI to continue from ("" = start fresh)
    error_dir: str = ""  # where a failing worker leaves its report for the driver (set by launch)
    labels: tuple[int, ...] = ()  # keep rows with these labels only, relabelled 0..k-1 (data.select_classes)
    label_fraction: float = 1.0  # of the training rows, chosen by a stable hash of the key
    init_state: dict | None = None  # starting weights (train.init_from): every tensor but the head's
    vocab: tuple[str, ...] = ()  # a language model: its tokens by id; the main rank logs a sample every epoch
    joiner: str = " "  # between sampled tokens ("" for characters)
    trial: object = None  # a dlpipe.tuning.TrialSpec: the main rank reports each epoch to the study and stops when pruned


class HorovodDist:
    """Every collective under a name that repeats from step to step (per kind and size): Horovod's
    response cache then answers a repeated collective without negotiating it again. An unnamed one
    gets a new name each call, which filled the cache (1024 entries), evicted on every step and
    cost a full negotiation per step."""

    def __init__(self, hvd):
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()

    def sum(self, values):
        return self.hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=self.hvd.Sum,
                                  name=f"dlpipe.sum.{len(values)}").tolist()

    def min(self, value):
        return int(self.hvd.allreduce(torch.tensor([value]), op=self.hvd.Min, name="dlpipe.min").item())

    def average_(self, tensor):
        self.hvd.allreduce_(tensor, op=self.hvd.Average, name=f"dlpipe.average.{tensor.dtype}.{tensor.numel()}")

    def broadcast_(self, tensor, root=0):
        self.hvd.broadcast_(tensor, root_rank=root)

    def start_average_(self, tensor, key):
        return self.hvd.allreduce_async_(tensor, op=self.hvd.Average, name=f"dlpipe.{key}")

    def finish_(self, handle):
        self.hvd.synchronize(handle)


class TorchDist:
    """torch.distributed: NCCL on GPU workers, Gloo on CPU workers."""

    def __init__(self, device: torch.device):
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.td, self.device = td, device
        self.rank, self.size = td.get_rank(), td.get_world_size()

    def sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.td.all_reduce(t)
        return t.tolist()

    def min(self, value):
        t = torch.tensor([value], device=self.device)
        self.td.all_reduce(t, op=self.td.ReduceOp.MIN)
        return int(t.item())

    def average_(self, tensor):
        self.td.all_reduce(tensor)
        tensor.div_(self.size)

    def broadcast_(self, tensor, root=0):
        self.td.broadcast(tensor, root)


def pick_device(use_gpu: str | bool, local_rank: int) -> torch.device:
    """CUDA device `local_rank` (modulo the visible devices) when asked for and present."""
    available = torch.cuda.is_available()
    if use_gpu is True and not available:
        raise RuntimeError("train.use_gpu=true but this worker sees no CUDA device")
    if use_gpu is False or not available:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


ROW_GROUPS_PER_WORKER = 8  # fewer row groups per worker than this: stride over rows, not row groups


def load_shard(files: list[str], shape: tuple[int, ...], rank: int, size: int, max_rows: int = 0, *,
               task: str = "classification", labels: tuple[int, ...] = (), fraction: float = 1.0):
    """This worker's rows of a pinned Delta snapshot, read with pyarrow into contiguous arrays:
    the `pixels` column of an image table, `features` of a table, `ids` of a text table, `nodes`
    of a tree table, `history` of time-series windows or `given` (else `ratings`) of rating vectors, and `label` (int
    for classification, double for regression), `target` (windows: the next values), `ratings`
    (rating vectors) or zeros (a language model predicts its own input; word vectors have no target).

    With at least ROW_GROUPS_PER_WORKER row groups per worker they are dealt out round-robin by
    rank; with fewer, every worker strides over the rows of all of them (row i to rank i % size),
    because one row group may hold one class (a prepare of class folders writes them so) and a few
    dealt out would give each worker other classes. `labels` keeps those classes (relabelled 0..k-1);
    `fraction` < 1 keeps that share of rows by a stable hash of `key`. The driver never touches the data."""
    parquet = {f: _open_parquet(f) for f in files}  # footers read once
    names = next(iter(parquet.values())).schema_arrow.names if parquet else ["pixels"]
    column = next((c for c in ("pixels", "features", "ids", "history", "ratings", "nodes") if c in names), "pixels")
    # windows predict their `target` values; a language model predicts its own next tokens; a recommender
    # predicts `ratings` from the user's known ones (`given` in val and test, the ratings themselves in train)
    target = "target" if column == "history" else None if task in ("language_model", "embedding") else \
        "ratings" if column == "ratings" else "label"
    if column == "ratings" and "given" in names:
        column = "given"
    columns = list(dict.fromkeys(([target] if target else []) + [column] + (["key"] if fraction < 1 else [])))
    pieces = [(f, g) for f, handle in parquet.items() for g in range(handle.num_row_groups)]
    tables = []
    if len(pieces) >= ROW_GROUPS_PER_WORKER * size:
        for i, (f, g) in enumerate(pieces):
            if i % size == rank:
                tables.append((parquet[f].read_row_group(g, columns=columns), f"{f} row group {g}"))
    else:
        start = 0  # of this row group, in all the rows
        for f, g in pieces:
            table = parquet[f].read_row_group(g, columns=columns)
            tables.append((table.take(np.arange((rank - start) % size, table.num_rows, size)), f"{f} row group {g}"))
            start += table.num_rows
    tables = [(_select(t, labels, fraction), where) for t, where in tables]
    rows = sum(t.num_rows for t, _ in tables)
    x = np.empty((rows, *shape), dtype=np.float32)
    ys = []
    at = 0
    for t, where in tables:
        n = t.num_rows
        values = tensors.values(t.column(column), column)  # stored bytes or arrays
        if values.size != n * int(np.prod(shape)):
            raise ValueError(f"{where}: {column} hold {values.size} values for {n} rows, expected {int(np.prod(shape))} "
                             f"per row (input shape {shape})")
        x[at : at + n] = values.reshape(n, *shape)
        if target in ("target", "ratings"):
            ys.append(pc.list_flatten(t.column(target)).to_numpy().astype(np.float32).reshape(n, -1))
        elif target:
            ys.append(t.column("label").to_numpy())
        at += n
    dtype = np.int64 if task == "classification" else np.float32
    y = np.concatenate(ys).astype(dtype) if ys else np.zeros(rows, dtype)
    if labels:  # original label -> its position in `labels`
        lookup = np.full(max(labels) + 1, -1, dtype=np.int64)
        lookup[list(labels)] = np.arange(len(labels))
        y = lookup[y]
    if max_rows:
        keep = max(max_rows // size, 1)
        x, y = x[:keep], y[:keep]
    return x, y


def _select(table: pa.Table, labels: tuple[int, ...], fraction: float) -> pa.Table:
    if labels:
        table = table.filter(pc.is_in(table.column("label"), value_set=pa.array(labels, table.column("label").type)))
    if fraction < 1:
        keep = [zlib.crc32(k.encode()) % 10_000 < fraction * 10_000 for k in table.column("key").to_pylist()]
        table = table.filter(pa.array(keep, pa.bool_()))
    return table


def _open_parquet(uri: str) -> pq.ParquetFile:
    filesys, path = filesystem(uri)  # local, file://, s3://, hdfs://
    return pq.ParquetFile(filesys.open_input_file(path))


def _connect(backend: str):
    """(Dist, local rank) for this worker process."""
    if backend == "horovod":
        import horovod.torch as hvd

        hvd.init()
        return HorovodDist(hvd), hvd.local_rank()
    if backend == "torch_distributor":
        return None, int(os.environ.get("LOCAL_RANK", "0"))  # the Dist needs the device first
    return SingleProcess(), 0


def train_worker(task: TrainTask, backend: str):
    """Runs on every worker. Rank 0 returns the weights and history. A worker that fails leaves a
    report naming its rank in task.error_dir before re-raising, so the driver can name it."""
    rank = os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "?"))
    try:
        torch.set_num_threads(task.threads)
        if backend == "horovod" and task.train.elastic:
            return _train_elastic(task)
        dist, local_rank = _connect(backend)
        device = pick_device(task.train.use_gpu, local_rank)
        dist = dist or TorchDist(device)
        rank = dist.rank
        shape, kind = tuple(task.net.input_shape), task.net.task
        rows = task.train.max_rows
        train = load_shard(task.train_files, shape, dist.rank, dist.size, rows, task=kind,
                           labels=task.labels, fraction=task.label_fraction)
        val = load_shard(task.val_files, shape, dist.rank, dist.size, rows, task=kind, labels=task.labels)
        torch.manual_seed(task.train.seed)  # the same initial weights for any world size
        model = build(task.net)
        if task.init_state:
            load_features(model, task.init_state)
        main = dist.rank == 0
        reporter = None
        if task.trial is not None and main:
            from dlpipe.tuning import Reporter

            reporter = Reporter(task.trial)
        sender = outbox.Sender(task.tracking_uri, task.run_id) if main and task.run_id else None
        history = fit(
            model, train, val, task.train, dist, task=kind, device=device,
            resume=checkpoints.load(task.resume_from) if task.resume_from else None,
            on_epoch=_mlflow_logger(task, model, val[0], sender) if sender else None,
            save_checkpoint=(lambda state: checkpoints.save(task.checkpoint_dir, state)) if main and task.checkpoint_dir else None,
            stop=(reporter or (lambda metrics: False)) if task.trial is not None else None,
            log=lambda line: print(line, flush=True),
        )
        rows = dist.sum([len(train[0])])[0]  # a collective: every rank takes part
        return _result(dist, model, history, sender, int(rows), device, reporter.pruned_at if reporter else None)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver with the rank, then re-raised
        print(f"dlpipe: worker rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        _report_failure(task.error_dir, rank, exc)
        raise
    finally:
        if backend == "torch_distributor" and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_elastic(task: TrainTask):
    """Horovod elastic: every worker holds every training row (fit deals them out by the world size
    of the moment) and the state of the last commit. A worker lost raises HorovodInternalError in
    the others' next collective; a worker that comes back is announced at the next commit. Either
    way hvd.elastic.run re-forms the world and calls `attempt` again, which goes on from the last
    commit (rank 0's, broadcast to a newcomer). Rank 0 logs the world size at every (re)start."""
    import horovod.torch as hvd
    from horovod.common.elastic import State

    class Committed(State):
        """The last commit, a snapshot from fit (already a copy)."""

        def __init__(self, saved):
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
            self.saved, self.pending = saved, None

        def put(self, snapshot):
            self.pending = snapshot
            self.commit()  # saves, then raises HostsUpdatedInterrupt when a worker is waiting to join

        def save(self):
            self.saved = self.pending

        def restore(self):
            pass  # `saved` changes only by a commit

        def sync(self):  # named: unnamed, a newcomer's None and rank 0's dict would be two collectives
            self.saved = hvd.broadcast_object(self.saved, root_rank=0, name="dlpipe.elastic.saved")

    hvd.init()
    shape, kind, rows = tuple(task.net.input_shape), task.net.task, task.train.max_rows
    train = load_shard(task.train_files, shape, 0, 1, rows, task=kind, labels=task.labels, fraction=task.label_fraction)
    val_all = load_shard(task.val_files, shape, 0, 1, rows, task=kind, labels=task.labels)
    state = Committed(checkpoints.load(task.resume_from) if task.resume_from else None)
    device = pick_device(task.train.use_gpu, hvd.local_rank())
    sender, logged = None, set()  # rank 0's, kept while this process stays rank 0; epochs already logged

    @hvd.elastic.run
    def attempt(state):
        nonlocal sender
        dist = HorovodDist(hvd)
        main = dist.rank == 0
        val = (val_all[0][dist.rank :: dist.size], val_all[1][dist.rank :: dist.size])
        torch.manual_seed(task.train.seed)
        model = build(task.net)
        if task.init_state:
            load_features(model, task.init_state)
        resume = state.saved
        if main:
            sender = sender or (outbox.Sender(task.tracking_uri, task.run_id) if task.run_id else None)
            within = (resume or {}).get("within")
            where = f"epoch {resume['epoch'] + 1}" + (f" at row {within['position']}" if within else "") if resume else "the start"
            print(f"dlpipe: elastic: {dist.size} workers, from {where}", flush=True)
            if sender:
                sender.put([outbox.metric("workers", dist.size, (resume["epoch"] if resume else 0) + 1)])
        log_epoch = _mlflow_logger(task, model, val[0], sender) if main and sender else None

        def on_epoch(metrics):  # an epoch redone after a loss during its closing commit is logged once
            if metrics["epoch"] not in logged:
                logged.add(metrics["epoch"])
                log_epoch(metrics)

        history = fit(model, train, val, task.train, dist, task=kind, device=device, resume=resume, commit=state.put,
                      on_epoch=on_epoch if log_epoch else None,
                      save_checkpoint=(lambda s: checkpoints.save(task.checkpoint_dir, s)) if main and task.checkpoint_dir else None,
                      log=lambda line: print(line, flush=True))
        return model, history, dist

    model, history, dist = attempt(state)
    return _result(dist, model, history, sender, len(train[0]), device, None)  # every worker held every row


def _result(dist, model: torch.nn.Module, history: list[dict], sender, rows: int, device, pruned_at):
    """Rank 0's result for the driver (None on the others, after the collective they take part in):
    the weights, history, throughput per worker and the epoch records the sender could not deliver
    (the driver sends them, or keeps them in the outbox)."""
    unsent = sender.close() if sender else []
    mine = history[-1]["worker_samples_per_sec"] if history else 0.0
    per_worker = dist.sum([mine if i == dist.rank else 0.0 for i in range(dist.size)])
    if dist.rank != 0:
        return None
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "history": history,
            "train_rows": rows, "world_size": dist.size, "device": str(device),
            "worker_samples_per_sec": per_worker, "pruned_at": pruned_at, "unsent": unsent}


def load_features(model: torch.nn.Module, state: dict) -> None:
    """Every weight of a pretrained net except its head (the new head keeps its fresh init)."""
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"pretrained weights do not fit this model: missing {missing}, unexpected {unexpected}")


def _report_failure(error_dir: str, rank, exc: BaseException) -> None:
    """Best effort: the launchers' own errors do not carry the worker's exception."""
    try:
        filesys, path = filesystem(error_dir)
        filesys.create_dir(path, recursive=True)
        with filesys.open_output_stream(f"{path}/rank-{rank}.txt") as out:
            out.write(f"{rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}".encode())
    except Exception:  # noqa: BLE001 - never hide the original error
        pass


SAMPLE_PROMPT, SAMPLE_LENGTH = 20, 200  # tokens of the first validation row, tokens generated


def _mlflow_logger(task: TrainTask, model: torch.nn.Module, val_x: np.ndarray, sender: outbox.Sender):
    """Each epoch's metrics (and a language model's sample) to the run, through `sender`'s thread."""

    def log(metrics: dict) -> None:
        step = metrics["epoch"]
        sender.put([outbox.metric(k, v, step) for k, v in metrics.items() if k != "epoch"])
        if task.vocab and len(val_x):
            prompt = [int(i) for i in val_x[0][:SAMPLE_PROMPT] if i != 0]
            was_training = model.training
            model.eval()
            drawn = model.generate(prompt, SAMPLE_LENGTH, temperature=0.8, seed=step)
            model.train(was_training)
            words = lambda ids: task.joiner.join(task.vocab[i] for i in ids)  # noqa: E731
            sender.put([outbox.text(f"prompt: {words(prompt)}\nsample (temperature 0.8): {words(drawn)}\n",
                                    f"samples/epoch_{step:03d}.txt")])

    return log
