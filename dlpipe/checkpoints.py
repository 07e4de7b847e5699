"""Training checkpoints: written by the main rank to <checkpoint_uri>/<run name>/<MLflow run id>/
as epoch-NNNN.pt, loaded with torch.load(weights_only=True)."""

from __future__ import annotations

import io
from typing import Callable

import torch
from pyarrow import fs

from dlpipe.storage import filesystem, join


def run_dir(root: str, run_name: str, run_id: str) -> str:
    return join(root, run_name, run_id)


def save(directory: str, state: dict) -> str:
    """Atomically (write, then rename) store `state` as epoch-NNNN.pt; returns its URI."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    filesys, path = filesystem(directory)
    filesys.create_dir(path, recursive=True)
    name = f"epoch-{int(state['epoch']):04d}.pt"
    with filesys.open_output_stream(f"{path}/.{name}.tmp") as out:
        out.write(buffer.getvalue())
    filesys.move(f"{path}/.{name}.tmp", f"{path}/{name}")
    return join(directory, name)


def load(uri: str) -> dict:
    filesys, path = filesystem(uri)
    with filesys.open_input_file(path) as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def latest(directory: str) -> str | None:
    filesys, path = filesystem(directory)
    infos = filesys.get_file_info(fs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.base_name.startswith("epoch-") and i.base_name.endswith(".pt"))
    return join(directory, names[-1]) if names else None


def start(directory: str) -> None:
    """Mark a run of this run name as started (its folder, empty until the first checkpoint): a
    driver killed before that checkpoint leaves a run the next train continues from the start."""
    filesys, path = filesystem(directory)
    filesys.create_dir(path, recursive=True)


def find_resumable(root: str, run_name: str, finished: Callable[[str], bool],
                   running: Callable[[str], bool] = lambda run_id: False) -> tuple[str, str] | None:
    """(run id, checkpoint URI) of the newest run of `run_name` that has a checkpoint and did not
    finish (crashed, killed, or still marked running), or (run id, "") of one started without a
    checkpoint yet and still marked `running` (its driver was killed: it starts again in the same
    run); None when there is none. A run that failed before its first checkpoint is not resumed."""
    filesys, path = filesystem(join(root, run_name))
    runs = [i for i in filesys.get_file_info(fs.FileSelector(path, allow_not_found=True)) if i.type == fs.FileType.Directory]
    for info in sorted(runs, key=lambda i: i.mtime_ns or 0, reverse=True):
        checkpoint = latest(join(root, run_name, info.base_name))
        if checkpoint is not None and not finished(info.base_name):
            return info.base_name, checkpoint
        if checkpoint is None and running(info.base_name):
            return info.base_name, ""
    return None
