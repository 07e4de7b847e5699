"""`dlpipe <command> --conf FILE [--set key=value ...] [--summary out.json]`; jobs/*.py call the
same code under spark-submit. Every config is loaded and validated before Spark starts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlpipe.config import ConfigError, load_config

# command -> one line of help; all take --conf/--set/--summary
COMMANDS = {
    "land-demo-data": "land the demo images as PNG files in class folders",
    "land": "land a packaged real dataset (data.kind) as raw files under paths.landing",
    "prepare": "raw files under paths.landing -> validated, versioned Delta tables",
    "train": "train on the pinned Delta versions (Horovod, TorchDistributor or local)",
    "evaluate": "evaluate a training run, register the model, set `champion` when good enough",
    "score": "append predictions of models:/<name>@champion to <name>_predictions",
    "retrain": "train a challenger on new data; promote it only if it beats the champion",
    "demo": "land, prepare, train, evaluate and score the demo dataset end to end",
    "bench": "benchmarks: training | prepare | score | models",
    "lake": "Delta table maintenance: vacuum | history",
    "models": "registry: describe | rollback",
    "explain": "occlusion heatmap of one image (PNG)",
    "embed": "embeddings of an image table into <name>_embeddings, with KMeans purity",
    "similar": "the k nearest images to one image by cosine similarity of embeddings",
}
STEPS = tuple(COMMANDS)
BENCHMARKS = ("training", "prepare", "score", "models")
FAMILIES = ("feedforward",)
NO_TRACKING = {"land-demo-data", "land", "prepare", "lake"}  # commands that never talk to MLflow


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conf", help="experiment YAML with overrides of conf/base.yaml")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=0.01 (repeatable)")
    common.add_argument("--summary", help="write what the command produced as JSON to this path")
    parser = argparse.ArgumentParser(prog="dlpipe", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True, metavar="command")
    cmds = {name: sub.add_parser(name, parents=[common], help=text, description=text) for name, text in COMMANDS.items()}
    cmds["bench"].add_argument("benchmark", choices=BENCHMARKS)
    cmds["bench"].add_argument("--family", choices=FAMILIES, default="feedforward", help="bench models: which family")
    cmds["lake"].add_argument("action", choices=("vacuum", "history"))
    cmds["lake"].add_argument("--table", required=True, help="the Delta table URI (path, file://, s3://, hdfs://)")
    cmds["lake"].add_argument("--retain-hours", type=int, help="vacuum: keep the files versions of the last N hours need")
    cmds["lake"].add_argument("--dry-run", action="store_true", help="vacuum: only list the files")
    cmds["models"].add_argument("action", choices=("describe", "rollback"))
    cmds["models"].add_argument("name", nargs="?", help="registered model name (default: registry.model_name)")
    for name in ("explain", "embed"):
        cmds[name].add_argument("--model", default="", help="model URI (default models:/<registry.model_name>@champion)")
    for name in ("explain", "similar"):
        cmds[name].add_argument("--image", required=True, help="the image file (path or URI)")
    cmds["explain"].add_argument("--out", default="heatmap.png", help="where to write the heatmap PNG")
    cmds["similar"].add_argument("--k", type=int, default=10, help="how many nearest images")
    args = parser.parse_args(argv)
    if args.step == "lake" and args.action == "vacuum" and args.retain_hours is None:
        parser.error("`dlpipe lake vacuum` needs --retain-hours N")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.conf, args.overrides)  # before Spark starts
    except ConfigError as exc:
        print(f"dlpipe: config error: {exc}", file=sys.stderr)
        return 2
    from dlpipe import registry

    try:
        if args.step not in NO_TRACKING:  # an unreachable tracking server fails in one line, before Spark starts
            registry.check_reachable(cfg.mlflow.tracking_uri)
    except registry.TrackingUnreachable as exc:
        print(f"dlpipe: error: {exc}", file=sys.stderr)
        return 1
    try:
        summary = run(args, cfg)
    except ConfigError as exc:  # e.g. lake.engine=spark without the delta-spark jars
        print(f"dlpipe: config error: {exc}", file=sys.stderr)
        return 2
    except (LookupError, TimeoutError, OSError, ValueError) as exc:
        if args.step not in ("lake", "models") and not isinstance(exc, OSError):
            raise  # storage errors (no bucket, access denied, no such path) are one line for every command
        print(f"dlpipe: error: {exc}", file=sys.stderr)  # no such table, bucket, version or alias: one line
        return 1
    if args.step == "demo":
        print(render_demo(summary), flush=True)
    elif args.step == "models" and args.action == "describe":
        print(registry.render(summary), flush=True)
    else:
        print(json.dumps(summary, indent=2, default=str), flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def run(args: argparse.Namespace, cfg) -> dict:
    from dlpipe import steps

    if args.step == "land-demo-data":
        return steps.land_demo_data(cfg)
    if args.step == "land":
        return steps.land(cfg)
    if args.step == "lake":
        return lake_command(args, cfg)
    if args.step == "models":
        return models_command(args, cfg)
    if args.step == "explain":  # one image, no Spark
        from dlpipe import explain, tracking

        tracking.setup(cfg.mlflow)
        return explain.explain(args.model or f"models:/{cfg.registry.model_name}@champion", args.image, args.out)

    from dlpipe import bench, retrain, similar
    from dlpipe.spark import get_session

    spark = get_session(cfg.spark.master, f"{cfg.spark.app_name}-{args.step}", cfg.spark.conf,
                        jars_dir=cfg.spark.jars_dir, engine=cfg.lake.engine)
    if args.step == "bench":
        job = {"training": steps.bench_training, "prepare": bench.prepare, "score": steps.bench_score,
               "models": lambda spark, cfg: bench.models(spark, cfg, args.family)}[args.benchmark]
    else:
        job = {"prepare": steps.prepare, "train": steps.train, "evaluate": steps.evaluate, "score": steps.score,
               "retrain": retrain.retrain, "demo": steps.demo,
               "embed": lambda spark, cfg: similar.embed(spark, cfg, args.model),
               "similar": lambda spark, cfg: similar.similar(spark, cfg, args.image, args.k)}[args.step]
    return job(spark, cfg) | {"spark_master": spark.sparkContext.master,
                              "spark_app_id": spark.sparkContext.applicationId}


def lake_command(args: argparse.Namespace, cfg) -> dict:
    """delta-rs without Spark, unless lake.engine=spark."""
    from dlpipe import lake

    if args.action == "history":
        return {"step": "lake history", "table": args.table, "history": lake.history(args.table)}
    spark = None
    if cfg.lake.engine == "spark":
        from dlpipe.spark import get_session

        spark = get_session(cfg.spark.master, f"{cfg.spark.app_name}-lake", cfg.spark.conf,
                            jars_dir=cfg.spark.jars_dir, engine="spark")
    files = lake.vacuum(args.table, args.retain_hours, dry_run=args.dry_run, spark=spark)
    return {"step": "lake vacuum", "table": args.table, "retain_hours": args.retain_hours, "dry_run": args.dry_run,
            "files_to_delete" if args.dry_run else "files_deleted": files,
            "latest_version": lake.latest_version(args.table)}


def models_command(args: argparse.Namespace, cfg) -> dict:
    from mlflow.tracking import MlflowClient

    from dlpipe import registry

    name = args.name or cfg.registry.model_name
    client = MlflowClient(cfg.mlflow.tracking_uri)
    if args.action == "describe":
        return registry.describe(client, name)
    return registry.rollback(client, name, cfg.registry.lock_ttl_s, cfg.registry.lock_wait_s)


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
