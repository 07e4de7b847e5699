"""The model registry: lineage tags on every version, the aliases `champion`, `challenger`,
`previous` and `rolled_back`, a lease lock around every alias change, describe and rollback.

MLflow has no atomic compare-and-set on aliases, so alias changes happen under a lock: a
registered model named `<name>.lock` whose creation fails with RESOURCE_ALREADY_EXISTS while
another job holds it (a unique name in every registry store). Its tags say who holds it and
until when; a lock past its expiry was left by a crashed job and the next job breaks it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dlpipe import lake
from dlpipe.errors import TrackingUnreachable  # re-exported
from dlpipe.refs import SPLITS, TableRef

CHAMPION, CHALLENGER, PREVIOUS, ROLLED_BACK = "champion", "challenger", "previous", "rolled_back"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS, ROLLED_BACK)
HIGHER_IS_BETTER = {"test_accuracy": True, "test_log_loss": False, "test_roc_auc": True,
                    "test_r2": True, "test_mse": False, "test_mae": False, "test_qe": False, "test_bpc": False,
                    "test_rmse": False, "test_loss": False, "test_pair_accuracy": True}


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line naming the URI, when an http(s) tracking server does not answer
    (MLflow's own client would retry for minutes first)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as exc:
        raise TrackingUnreachable(
            f"MLflow tracking server {tracking_uri} is unreachable ({type(exc).__name__}); nothing was trained or registered"
        ) from None
    if response.status_code != 200:
        raise TrackingUnreachable(
            f"MLflow tracking server {tracking_uri} answered /health with HTTP {response.status_code}; "
            "nothing was trained or registered")


# ---------------------------------------------------------------- lineage

def code_version() -> dict[str, str]:
    """The package version and, when the code is a git checkout (or DLPIPE_GIT_SHA is set, as in
    the Docker images), the commit."""
    try:
        version = metadata.version("dlpipe")
    except metadata.PackageNotFoundError:
        version = "unknown"
    sha = os.environ.get("DLPIPE_GIT_SHA", "")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                 text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
    return {"package_version": version, "git_sha": sha or "unknown"}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def lineage_tags(client: MlflowClient, run_id: str, tables: dict[str, TableRef], metrics: dict[str, float]) -> dict[str, str]:
    """Everything a registered version must say about where it came from."""
    config = json.loads(Path(client.download_artifacts(run_id, "config.json")).read_text())
    code = code_version()
    params = client.get_run(run_id).data.params
    tags = {
        "dlpipe.run_id": run_id,
        "dlpipe.config_sha256": config_hash(config),
        "dlpipe.config_artifact": f"runs:/{run_id}/config.json",
        "dlpipe.code.package_version": code["package_version"],
        "dlpipe.code.git_sha": code["git_sha"],
    }
    for split, table in tables.items():
        tags[f"dlpipe.table.{split}"] = str(table)
        tags[f"dlpipe.rows.{split}"] = str(lake.table_rows(table.uri, table.version))
    if "train.rows" in params:
        tags["dlpipe.rows.train_used"] = params["train.rows"]
    for name, value in metrics.items():
        tags[f"dlpipe.metric.{name}"] = repr(float(value))
    return tags


def tables_of(version) -> dict[str, TableRef]:
    """The table versions a registered version was trained and evaluated on (its lineage tags)."""
    return {split: TableRef.parse(version.tags[f"dlpipe.table.{split}"]) for split in SPLITS
            if version.tags.get(f"dlpipe.table.{split}")}


def metric_of(version, metric: str) -> float | None:
    value = version.tags.get(f"dlpipe.metric.{metric}")
    return None if value is None else float(value)


def register(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, str]):
    """Register a run's model with its lineage tags in one call (the version is created only
    once everything it needs is logged); a run already registered returns its version."""
    import mlflow

    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return existing[0]
    return mlflow.register_model(model_uri, name, tags=tags)


def versions_trained_on(client: MlflowClient, name: str, tables: dict[str, TableRef]) -> list:
    """Registered versions of `name` whose train/val/test lineage is exactly `tables`."""
    wanted = dict(tables)
    try:
        versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    except MlflowException:
        return []
    return sorted((v for v in versions if tables_of(v) == wanted), key=lambda v: int(v.version))


def alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def beats(metric: str, challenger: float, champion: float, min_improvement: float) -> tuple[bool, str]:
    """(wins, why) for a challenger against the champion on the same holdout."""
    gain = challenger - champion if HIGHER_IS_BETTER[metric] else champion - challenger
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    text = f"{metric} {challenger:.4f} vs champion {champion:.4f} ({direction} is better; gain {gain:+.4f})"
    if gain > 0 and gain >= min_improvement:
        return True, f"{text} >= registry.min_improvement {min_improvement}"
    return False, f"{text} is below registry.min_improvement {min_improvement}"


# ---------------------------------------------------------------- the lock

def _lock_tags(client: MlflowClient, lock: str) -> dict[str, str] | None:
    try:
        return client.get_registered_model(lock).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _release(client: MlflowClient, lock: str, owner: str) -> None:
    """Delete the lock only if `owner` still holds it."""
    tags = _lock_tags(client, lock)
    if tags is not None and tags.get("owner") == owner:
        try:
            client.delete_registered_model(lock)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise


def _started(pid) -> str:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat field 22; the command
    name before it, in parentheses, may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _process() -> str:
    """This process, told apart from any other on any machine: host, pid namespace, pid, start time
    ("" where /proc does not say)."""
    try:
        namespace, started = os.readlink("/proc/self/ns/pid"), _started(os.getpid())
    except (OSError, IndexError):
        return ""
    return f"{socket.gethostname()}|{namespace}|{os.getpid()}|{started}"


def _gone(process: str) -> bool:
    """True only when `process` (a _process() string) ran where this one runs and has ended; a
    holder elsewhere, or one /proc cannot judge, is waited for until its lock expires."""
    parts = process.split("|")
    here = _process().split("|")
    if len(parts) != 4 or len(here) != 4 or parts[:2] != here[:2]:
        return False
    try:
        return _started(parts[2]) != parts[3]  # the pid now belongs to another process
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def lock(client: MlflowClient, name: str, ttl_s: int, wait_s: int):
    """Hold `<name>.lock` for the body. Waits up to wait_s for a live holder; breaks a lock past
    its expiry, or at once one whose holder ran on this machine and has ended (killed, crashed).
    Yields the owner id."""
    lock_name = f"{name}.lock"
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.time() + wait_s
    while True:
        expires = time.time() + ttl_s
        try:
            client.create_registered_model(lock_name, tags={"owner": owner, "expires_at": f"{expires:.3f}",
                                                            "process": _process()},
                                           description=f"dlpipe promotion lock for {name}; held by {owner}")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lock_tags(client, lock_name)
        if held is None:
            continue  # released between our two calls
        expired = float(held.get("expires_at", 0)) < time.time()
        if expired or _gone(held.get("process", "")):
            say(f"breaking stale lock {lock_name} held by {held.get('owner')} "
                f"({'expired' if expired else 'its process has ended'})")
            _release(client, lock_name, held.get("owner", ""))
            continue
        if time.time() > deadline:
            raise TimeoutError(f"{lock_name} is held by {held.get('owner')} until "
                               f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(float(held['expires_at'])))}; "
                               f"gave up after registry.lock_wait_s={wait_s}")
        time.sleep(0.5)
    try:
        yield owner
    finally:
        _release(client, lock_name, owner)


# ---------------------------------------------------------------- alias moves (call under the lock)

def set_aliases(client: MlflowClient, name: str, moves: list[tuple[str, str | None]]) -> None:
    """Apply (alias, version or None = delete) in order; on failure say what is left."""
    done = []
    for alias, version in moves:
        try:
            if version is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, version)
        except Exception as exc:
            applied = ", ".join(f"{a}->{v}" for a, v in done) or "none"
            left = ", ".join(f"{a}->{v}" for a, v in moves[len(done):])
            raise RuntimeError(f"setting aliases of {name} failed at {alias}->{version} ({type(exc).__name__}: {exc}); "
                               f"applied: {applied}; not applied: {left}") from None
        done.append((alias, version))


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """`version` becomes champion; the champion it replaces becomes previous. Returns the
    replaced version (None if there was none)."""
    old = alias_version(client, name, CHAMPION)
    old_version = str(old.version) if old else None  # int from SQL stores, str over REST
    if old_version == str(version):
        return None
    moves: list[tuple[str, str | None]] = [(CHAMPION, str(version))]
    if old_version:
        moves.append((PREVIOUS, old_version))
        client.set_model_version_tag(name, str(version), "dlpipe.replaced", old_version)
    challenger = alias_version(client, name, CHALLENGER)
    if challenger and str(challenger.version) == str(version):
        moves.append((CHALLENGER, None))
    set_aliases(client, name, moves)
    return old_version


def rollback(client: MlflowClient, name: str, ttl_s: int, wait_s: int) -> dict:
    """champion -> the `previous` version; the demoted one gets `rolled_back` (so it is kept and
    visible, and a retrain never re-promotes it on the same tables); `previous` moves to the
    version the restored champion had replaced, or is removed."""
    with lock(client, name, ttl_s, wait_s):
        champion, previous = alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)
        if champion is None or previous is None:
            raise LookupError(f"model {name!r} has no {'champion' if champion is None else 'previous'} version: "
                              "nothing to roll back to")
        earlier = previous.tags.get("dlpipe.replaced")
        if earlier in (str(champion.version), str(previous.version)) or (earlier and not _exists(client, name, earlier)):
            earlier = None
        client.set_model_version_tag(name, str(champion.version), "dlpipe.rolled_back_at",
                                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        set_aliases(client, name, [(CHAMPION, str(previous.version)), (ROLLED_BACK, str(champion.version)),
                                    (PREVIOUS, earlier)])
    say(f"{name}: champion {champion.version} -> {previous.version}; version {champion.version} is now rolled_back")
    return {"step": "models rollback", "model_name": name, "champion": int(previous.version),
            "rolled_back": int(champion.version), "previous": int(earlier) if earlier else None}


def _exists(client: MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
        return True
    except MlflowException:
        return False


# ---------------------------------------------------------------- describe

def describe(client: MlflowClient, name: str) -> dict:
    """champion, challenger, previous and rolled_back with lineage and metrics."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise LookupError(f"no registered model named {name!r} in {client.tracking_uri}") from None
    out = {"model_name": name, "tracking_uri": client.tracking_uri, "aliases": {}}
    for alias in ALIASES:
        if alias not in model.aliases:
            continue
        v = client.get_model_version(name, model.aliases[alias])
        t = v.tags
        out["aliases"][alias] = {
            "version": int(v.version), "run_id": v.run_id, "created": v.creation_timestamp,
            "tables": {s: ref.to_dict() | {"rows": int(t.get(f"dlpipe.rows.{s}", -1))} for s, ref in tables_of(v).items()},
            "rows_train_used": int(t["dlpipe.rows.train_used"]) if "dlpipe.rows.train_used" in t else None,
            "metrics": {k.removeprefix("dlpipe.metric."): float(x) for k, x in t.items() if k.startswith("dlpipe.metric.")},
            "config_sha256": t.get("dlpipe.config_sha256"), "config_artifact": t.get("dlpipe.config_artifact"),
            "code": {"package_version": t.get("dlpipe.code.package_version"), "git_sha": t.get("dlpipe.code.git_sha")},
            "retrain_outcome": t.get("dlpipe.retrain.outcome"), "replaced": t.get("dlpipe.replaced"),
        }
    return out


def render(described: dict) -> str:
    lines = [f"model {described['model_name']}  ({described['tracking_uri']})"]
    if not described["aliases"]:
        lines.append("  no aliases set")
    for alias, v in described["aliases"].items():
        lines.append(f"{alias}: version {v['version']}  run {v['run_id']}")
        for split, t in v["tables"].items():
            lines.append(f"    {split:5s} {t['uri']}@{t['version']}  ({t['rows']} rows)")
        lines.append("    metrics: " + ", ".join(f"{k}={x:.4f}" for k, x in sorted(v["metrics"].items())))
        lines.append(f"    config sha256 {v['config_sha256']}  ({v['config_artifact']})")
        lines.append(f"    code dlpipe {v['code']['package_version']}  git {v['code']['git_sha']}")
        if v["retrain_outcome"]:
            lines.append(f"    retrain: {v['retrain_outcome']}")
    return "\n".join(lines)
