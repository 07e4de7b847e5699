"""`dlpipe demo`: land, prepare, train, evaluate and score the demo dataset end to end, each
stage taking the references the one before it returned."""

from __future__ import annotations

import dataclasses

from pyspark.sql import SparkSession

from dlpipe.config import Config
from dlpipe.stages import evaluate, land, prepare, score, train


def run(spark: SparkSession, cfg: Config) -> dict:
    """Runs five stages, so it takes the whole config."""
    data, paths, dataset = land.demo_sections(cfg.data, cfg.paths)
    cfg = dataclasses.replace(cfg, data=data, paths=paths)
    steps = {"land": land.run_demo(cfg.data, cfg.paths), "prepare": prepare.run(spark, cfg.data, cfg.paths)}
    tables = {s: f"{t['uri']}@{t['version']}" for s, t in steps["prepare"]["tables"].items() if s in ("train", "val", "test")}
    steps["train"] = train.run(spark, dataclasses.replace(cfg.train, tables=tables), cfg.model, cfg.data, cfg.mlflow,
                               model_name=cfg.registry.model_name, table_uris={}, resolved_config=cfg.to_dict())
    steps["evaluate"] = evaluate.run(spark, cfg.data, cfg.model, cfg.registry, cfg.mlflow, run_id=steps["train"]["run_id"])
    if not steps["evaluate"]["champion"]:
        raise RuntimeError(f"the demo model did not reach registry.min_accuracy={cfg.registry.min_accuracy}; "
                           "nothing to score with")
    steps["score"] = score.run(spark, dataclasses.replace(cfg.score, model_uri=steps["evaluate"]["model_uri"]), cfg.mlflow,
                               model_name=cfg.registry.model_name, default_input=cfg.table_uri("test"),
                               out_uri=cfg.table_uri("predictions"))
    return {"step": "demo", "dataset": dataset, "steps": steps,
            "mlflow_ui": f"mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}"}


def render(summary: dict) -> str:
    s = summary["steps"]
    lines = [f"dlpipe demo on {summary['dataset']}", "tables:"]
    for table in s["prepare"]["tables"].values():
        lines.append(f"  {table['uri']}  version {table['version']}  ({table['rows']} rows)")
    pred = s["score"]["predictions"]
    lines += [
        f"  {pred['uri']}  version {pred['version']}  ({pred['rows_appended']} predictions appended)",
        f"training run: {s['train']['run_id']}  ({s['train']['backend']}, {s['train']['world_size']} workers)",
        f"test accuracy: {s['evaluate']['metrics']['test_accuracy']:.4f} on {s['evaluate']['metrics']['test_rows']} images",
        f"registered: models:/{s['evaluate']['model_name']}/{s['evaluate']['model_version']} (alias champion)",
        f"look at it: {summary['mlflow_ui']}",
    ]
    return "\n".join(lines)
