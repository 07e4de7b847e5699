"""`dlpipe <step> --conf FILE [--set key=value ...] [--summary out.json]`; jobs/*.py call the same
code under spark-submit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlpipe.config import ConfigError, load_config

STEPS = ("land-demo-data", "land", "prepare", "train", "evaluate", "score", "demo", "bench", "retrain")
BENCHMARKS = ("training", "score")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dlpipe", description=__doc__)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("benchmark", nargs="?", choices=BENCHMARKS, help="with `bench`: what to measure")
    parser.add_argument("--conf", help="experiment YAML with overrides of conf/base.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=0.01 (repeatable)")
    parser.add_argument("--summary", help="write what the step produced as JSON to this path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["models"]:
        return models_main(argv[1:])
    args = parse_args(argv)
    if (args.step == "bench") != (args.benchmark is not None):
        print(f"dlpipe: error: `dlpipe bench` takes one of {BENCHMARKS}; other steps take none", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.conf, args.overrides)  # before Spark starts
    except ConfigError as exc:
        print(f"dlpipe: config error: {exc}", file=sys.stderr)
        return 2

    from dlpipe import steps

    if args.step == "land-demo-data":
        summary = steps.land_demo_data(cfg)
    elif args.step == "land":
        summary = steps.land(cfg)
    else:
        from dlpipe import registry, retrain
        from dlpipe.spark import get_session

        try:
            if args.step != "prepare":  # an unreachable tracking server fails in one line, before Spark starts
                registry.check_reachable(cfg.mlflow.tracking_uri)
        except registry.TrackingUnreachable as exc:
            print(f"dlpipe: error: {exc}", file=sys.stderr)
            return 1
        spark = get_session(cfg.spark.master, f"{cfg.spark.app_name}-{args.step}", cfg.spark.conf)
        run = {"prepare": steps.prepare, "train": steps.train, "evaluate": steps.evaluate,
               "score": steps.score, "demo": steps.demo, "retrain": retrain.retrain,
               "bench": {"training": steps.bench_training, "score": steps.bench_score}.get(args.benchmark)}[args.step]
        summary = run(spark, cfg) | {"spark_master": spark.sparkContext.master,
                                     "spark_app_id": spark.sparkContext.applicationId}
    if args.step == "demo":
        print(render_demo(summary), flush=True)
    else:
        print(json.dumps(summary, indent=2, default=str), flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def models_main(argv: list[str]) -> int:
    """`dlpipe models describe|rollback [NAME] [--conf F] [--set k=v] [--summary out.json]`."""
    parser = argparse.ArgumentParser(prog="dlpipe models", description=models_main.__doc__)
    parser.add_argument("action", choices=("describe", "rollback"))
    parser.add_argument("name", nargs="?", help="registered model name (default: registry.model_name)")
    parser.add_argument("--conf", help="experiment YAML with overrides of conf/base.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--summary", help="write the result as JSON to this path")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.conf, args.overrides)
    except ConfigError as exc:
        print(f"dlpipe: config error: {exc}", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    from dlpipe import registry

    name = args.name or cfg.registry.model_name
    try:
        registry.check_reachable(cfg.mlflow.tracking_uri)
        client = MlflowClient(cfg.mlflow.tracking_uri)
        if args.action == "describe":
            summary = registry.describe(client, name)
            print(registry.render(summary), flush=True)
        else:
            summary = registry.rollback(client, name, cfg.registry.lock_ttl_s, cfg.registry.lock_wait_s)
            print(json.dumps(summary, indent=2), flush=True)
    except (registry.TrackingUnreachable, LookupError, TimeoutError) as exc:
        print(f"dlpipe: error: {exc}", file=sys.stderr)
        return 1
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def render_demo(summary: dict) -> str:
    s = summary["steps"]
    lines = [f"dlpipe demo on {summary['dataset']}", "tables:"]
    for name, table in s["prepare"]["tables"].items():
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


if __name__ == "__main__":
    sys.exit(main())
