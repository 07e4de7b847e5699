"""`dlpipe <step> --conf FILE [--set key=value ...] [--summary out.json]`; jobs/*.py call the same
code under spark-submit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlpipe.config import ConfigError, load_config

STEPS = ("land-demo-data", "land", "prepare", "train", "evaluate", "score", "demo", "bench", "explain", "embed", "similar")
BENCHMARKS = ("training", "models")
FAMILIES = ("feedforward",)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dlpipe", description=__doc__)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("benchmark", nargs="?", choices=BENCHMARKS, help="with `bench`: what to measure")
    parser.add_argument("--conf", help="experiment YAML with overrides of conf/base.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=0.01 (repeatable)")
    parser.add_argument("--summary", help="write what the step produced as JSON to this path")
    parser.add_argument("--model", default="", help="explain/embed: model URI (default models:/<registry.model_name>@champion)")
    parser.add_argument("--image", help="explain/similar: the image file (path or URI)")
    parser.add_argument("--out", default="heatmap.png", help="explain: where to write the heatmap PNG")
    parser.add_argument("--k", type=int, default=10, help="similar: how many nearest images")
    parser.add_argument("--family", choices=FAMILIES, default="feedforward", help="bench models: which model family")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if (args.step == "bench") != (args.benchmark is not None):
        print(f"dlpipe: error: `dlpipe bench` takes one of {BENCHMARKS}; other steps take none", file=sys.stderr)
        return 2
    if args.step in ("explain", "similar") and not args.image:
        print(f"dlpipe: error: `dlpipe {args.step}` needs --image", file=sys.stderr)
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
    elif args.step == "explain":  # one image, no Spark
        from dlpipe import explain, tracking

        tracking.setup(cfg.mlflow)
        summary = explain.explain(args.model or f"models:/{cfg.registry.model_name}@champion", args.image, args.out)
    else:
        from dlpipe.spark import get_session

        spark = get_session(cfg.spark.master, f"{cfg.spark.app_name}-{args.step}", cfg.spark.conf)
        from dlpipe import similar

        run = {"prepare": steps.prepare, "train": steps.train, "evaluate": steps.evaluate,
               "score": steps.score, "demo": steps.demo, "bench": steps.bench_training,
               "embed": lambda spark, cfg: similar.embed(spark, cfg, args.model),
               "similar": lambda spark, cfg: similar.similar(spark, cfg, args.image, args.k)}[args.step]
        if args.step == "bench" and args.benchmark == "models":
            from dlpipe import bench

            run = lambda spark, cfg: bench.models(spark, cfg, args.family)  # noqa: E731
        summary = run(spark, cfg) | {"spark_master": spark.sparkContext.master,
                                     "spark_app_id": spark.sparkContext.applicationId}
    if args.step == "demo":
        print(render_demo(summary), flush=True)
    else:
        print(json.dumps(summary, indent=2, default=str), flush=True)
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
