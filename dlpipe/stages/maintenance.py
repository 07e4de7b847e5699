"""`dlpipe lake vacuum|history` and `dlpipe models describe|rollback`: maintenance of the Delta
tables and of the model registry."""

from __future__ import annotations

from dlpipe.config import MlflowConfig, RegistryConfig


def lake(action: str, table: str, *, retain_hours: int | None = None, dry_run: bool = False, spark=None) -> dict:
    """history: the commits, newest first; vacuum: the files no version of the last retain_hours
    needs (native VACUUM when `spark` has delta-spark, else delta-rs)."""
    from dlpipe import lake as delta

    if action == "history":
        return {"step": "lake history", "table": table, "history": delta.history(table)}
    files = delta.vacuum(table, retain_hours, dry_run=dry_run, spark=spark)
    return {"step": "lake vacuum", "table": table, "retain_hours": retain_hours, "dry_run": dry_run,
            "files_to_delete" if dry_run else "files_deleted": files, "latest_version": delta.latest_version(table)}


def models(action: str, registry_cfg: RegistryConfig, mlflow_cfg: MlflowConfig, *, name: str = "") -> dict:
    from mlflow.tracking import MlflowClient

    from dlpipe import registry

    name = name or registry_cfg.model_name
    client = MlflowClient(mlflow_cfg.tracking_uri)
    if action == "describe":
        return registry.describe(client, name)
    return registry.rollback(client, name, registry_cfg.lock_ttl_s, registry_cfg.lock_wait_s)
