"""`dlpipe <step> --conf FILE [--set key=value ...] [--summary out.json]`; jobs/*.py call the same
code under spark-submit. `dlpipe lake vacuum|history --table URI` looks after Delta tables."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlpipe.config import ConfigError, load_config

STEPS = ("land-demo-data", "prepare", "train", "evaluate", "score", "demo", "bench", "lake")
BENCHMARKS = ("training", "prepare")
LAKE_COMMANDS = ("vacuum", "history")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dlpipe", description=__doc__)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("benchmark", nargs="?", choices=BENCHMARKS + LAKE_COMMANDS, metavar="what",
                        help=f"with `bench`: what to measure {BENCHMARKS}; with `lake`: {LAKE_COMMANDS}")
    parser.add_argument("--conf", help="experiment YAML with overrides of conf/base.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=0.01 (repeatable)")
    parser.add_argument("--summary", help="write what the step produced as JSON to this path")
    lake_args = parser.add_argument_group("lake")
    lake_args.add_argument("--table", help="with `lake`: the Delta table URI (path, file://, s3://, hdfs://)")
    lake_args.add_argument("--retain-hours", type=int, help="with `lake vacuum`: keep what versions of the last N hours need")
    lake_args.add_argument("--dry-run", action="store_true", help="with `lake vacuum`: only list the files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    wanted = {"bench": BENCHMARKS, "lake": LAKE_COMMANDS}.get(args.step, (None,))
    if args.benchmark not in wanted:
        print(f"dlpipe: error: `dlpipe bench` takes one of {BENCHMARKS}, `dlpipe lake` one of {LAKE_COMMANDS}; "
              "other steps take none", file=sys.stderr)
        return 2
    if args.step == "lake" and (not args.table or (args.benchmark == "vacuum" and args.retain_hours is None)):
        print("dlpipe: error: `dlpipe lake vacuum` needs --table URI --retain-hours N; `lake history` needs --table URI",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.conf, args.overrides)  # before Spark starts
    except ConfigError as exc:
        print(f"dlpipe: config error: {exc}", file=sys.stderr)
        return 2

    from dlpipe import steps

    if args.step == "land-demo-data":
        summary = steps.land_demo_data(cfg)
    elif args.step == "lake":
        try:
            summary = lake_command(args, cfg)
        except (OSError, ValueError) as exc:  # no such table, bucket or version: one line, no trace
            print(f"dlpipe: error: {exc}", file=sys.stderr)
            return 1
    else:
        from dlpipe.spark import get_session

        spark = get_session(cfg.spark.master, f"{cfg.spark.app_name}-{args.step}", cfg.spark.conf)
        run = {"prepare": steps.prepare, "train": steps.train, "evaluate": steps.evaluate,
               "score": steps.score, "demo": steps.demo, "bench": steps.bench_training}[args.step]
        if args.benchmark == "prepare":
            from dlpipe import bench

            run = bench.prepare
        summary = run(spark, cfg) | {"spark_master": spark.sparkContext.master,
                                     "spark_app_id": spark.sparkContext.applicationId}
    if args.step == "demo":
        print(render_demo(summary), flush=True)
    else:
        print(json.dumps(summary, indent=2, default=str), flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def lake_command(args: argparse.Namespace, cfg) -> dict:
    """delta-rs, no Spark, unless the config turns native Delta on (spark.sql.extensions)."""
    from dlpipe import lake

    if args.benchmark == "history":
        return {"step": "lake history", "table": args.table, "history": lake.history(args.table)}
    spark = None
    if "DeltaSparkSessionExtension" in str(cfg.spark.conf.get("spark.sql.extensions", "")):
        from dlpipe.spark import get_session

        spark = get_session(cfg.spark.master, f"{cfg.spark.app_name}-lake", cfg.spark.conf)
    files = lake.vacuum(args.table, args.retain_hours, dry_run=args.dry_run, spark=spark)
    return {"step": "lake vacuum", "table": args.table, "retain_hours": args.retain_hours, "dry_run": args.dry_run,
            "files_deleted" if not args.dry_run else "files_to_delete": files,
            "latest_version": lake.latest_version(args.table)}


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
