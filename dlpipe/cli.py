"""`dlpipe <command> [--conf FILE] [--set key=value ...] [--upstream SUMMARY] [--summary out.json]`.

COMMANDS is the whole CLI: a table from command name to the stage it runs (dlpipe.stages) with
the config sections that stage takes. jobs/*.py run the same table under spark-submit. The config
is loaded and validated, the launcher checked and the tracking server reached before Spark
starts; an expected failure is one line and its exit code (dlpipe.errors)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dlpipe import errors
from dlpipe.config import Config, load_config
from dlpipe.errors import ConfigError, DlpipeError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[..., dict]  # (spark or None, cfg, args) -> summary
    spark: bool = True  # starts (or joins) the SparkSession
    tracking: bool = True  # talks to MLflow: the tracking server is checked first
    trains: bool = False  # starts training workers: the train.backend launcher is checked first
    check: Callable[..., None] | None = None  # (cfg, args): more checks before Spark starts


def _land_demo(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import land

    return land.run_demo(cfg.data, cfg.paths)


def _land(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import land

    return land.run(cfg.data, cfg.paths)


def _prepare(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import prepare

    return prepare.run(spark, cfg.data, cfg.paths)


def _train(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import train

    return train.run(spark, cfg.train, cfg.model, cfg.data, cfg.mlflow, model_name=cfg.registry.model_name,
                     table_uris=cfg.model_tables(), resolved_config=cfg.to_dict())


def _evaluate(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import evaluate

    return evaluate.run(spark, cfg.data, cfg.model, cfg.registry, cfg.mlflow, run_id=cfg.evaluate.run_id)


def _score(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import score

    return score.run(spark, cfg.score, cfg.mlflow, model_name=cfg.registry.model_name,
                     default_input=cfg.table_uri("test"), out_uri=cfg.table_uri("predictions"))


def _retrain(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import retrain

    return retrain.run(spark, cfg)


def _tune_check(cfg: Config, args) -> None:
    from dlpipe import tuning
    from dlpipe.config import raw_config
    from dlpipe.launchers import check_backend
    from dlpipe.stages import tune

    if cfg.tune.placement == "distributed":  # trials in Spark tasks do not use train.backend
        check_backend(cfg.train.backend)
    args.space_params, args.raw = tuning.read_space(args.space), raw_config(args.conf, args.all_overrides)
    tune.check(cfg, args.space_params, args.raw)


def _tune(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import tune

    return tune.run(spark, cfg, args.space_params, args.raw)


def _demo(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import demo

    return demo.run(spark, cfg)


def _embed(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import embed, train

    tables = train.input_tables(cfg.train.tables, cfg.model_tables())
    return embed.run(spark, cfg.data, cfg.mlflow, model_uri=args.model or f"models:/{cfg.registry.model_name}@champion",
                     tables=tables, out_uri=cfg.table_uri("embeddings"), seed=cfg.train.seed,
                     run_name=cfg.registry.model_name)


def _similar(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import similar

    return similar.run(spark, cfg.mlflow, embeddings_uri=cfg.table_uri("embeddings"), image_uri=args.image, k=args.k)


def _explain(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import explain

    return explain.run(cfg.mlflow, model_uri=args.model or f"models:/{cfg.registry.model_name}@champion",
                       image_uri=args.image, out=args.out)


def _generate(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import generate

    return generate.run(cfg.mlflow, model_uri=args.model or f"models:/{cfg.registry.model_name}@champion",
                        prompt=args.prompt, length=args.length, temperature=args.temperature, seed=args.seed)


def _words(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import words

    return words.run(cfg.mlflow, action=args.action, model_uri=args.model or f"models:/{cfg.registry.model_name}@champion",
                     word=args.word, terms=args.terms, k=args.k)


def _anomalies(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import anomalies

    return anomalies.run(spark, cfg.mlflow, model_uri=args.model or f"models:/{cfg.registry.model_name}@champion",
                         table=args.table, top=args.top)


def _bench(spark, cfg: Config, args) -> dict:
    """A benchmark's summary, headed by what docs/performance.md records of the machine and the day."""
    benchmark = benchmark_module(args.benchmark)
    machine = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cores": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    summary = benchmark.run(spark, cfg, **({"family": args.family} if args.benchmark == "models" else {}))
    return machine | summary | {"load_average_after": os.getloadavg()[0]}


def _lake(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import maintenance

    if args.action == "vacuum" and cfg.lake.engine == "spark":
        spark = _session(cfg, "lake")  # native VACUUM; otherwise delta-rs, no Spark
    return maintenance.lake(args.action, args.table, retain_hours=args.retain_hours, dry_run=args.dry_run, spark=spark)


def _models(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import maintenance

    return maintenance.models(args.action, cfg.registry, cfg.mlflow, name=args.name or "")


def _recommend(spark, cfg: Config, args) -> dict:
    from dlpipe.stages import recommend

    return recommend.run(spark, cfg.mlflow, model_uri=args.model or f"models:/{cfg.registry.model_name}@champion",
                         ratings_uris={s: cfg.table_uri(s) for s in SPLITS}, out_uri=cfg.table_uri("recommendations"),
                         user=args.user, k=args.k)


def _config(spark, cfg: Config, args) -> dict:
    return cfg.to_dict()


COMMANDS: dict[str, Command] = {
    "land-demo-data": Command("land the demo images as PNG files in class folders", _land_demo, spark=False, tracking=False),
    "land": Command("land a packaged real dataset (data.dataset) as raw files under paths.landing", _land,
                    spark=False, tracking=False),
    "prepare": Command("raw files under paths.landing -> validated, versioned Delta tables", _prepare, tracking=False),
    "train": Command("train on table versions (train.tables; default the newest prepared set)", _train, trains=True),
    "evaluate": Command("evaluate a training run, register the model, set `champion` when good enough", _evaluate),
    "score": Command("predictions of one model version on one table version (score.input) into <name>_predictions",
                     _score),
    "retrain": Command("train a challenger on new data; promote it only if it beats the champion", _retrain, trains=True),
    "tune": Command("a hyperparameter study: trials of train over a search space (--space), many at once, "
                    "the best registered", _tune, check=_tune_check),
    "demo": Command("land, prepare, train, evaluate and score the demo dataset end to end", _demo, trains=True),
    "embed": Command("embeddings of an image table into <name>_embeddings, with KMeans purity (a word2vec "
                     "model: its words)", _embed),
    "similar": Command("the k nearest images to one image by cosine similarity of embeddings", _similar),
    "explain": Command("occlusion heatmap of one image (PNG)", _explain, spark=False),
    "generate": Command("text from a language model: the prompt continued by sampled tokens", _generate, spark=False),
    "words": Command("a word2vec model's nearest words (similar --word W) or analogies (analogy A B C)", _words,
                     spark=False),
    "anomalies": Command("the rows of a table an autoencoder (or a map) fits worst, by reconstruction error",
                         _anomalies),
    "recommend": Command("top-k unrated items per user from a recommender: --user U, or every user into "
                         "<name>_recommendations", _recommend),
    "bench": Command("benchmarks (from a checkout): training | prepare | score | models | tune | elastic", _bench, trains=True),
    "lake": Command("Delta table maintenance: vacuum | history", _lake, spark=False, tracking=False),
    "models": Command("registry: describe | rollback", _models, spark=False),
    "config": Command("print the resolved config (defaults <- --conf <- --set) as JSON", _config, spark=False,
                      tracking=False),
}
STEPS = tuple(COMMANDS)
BENCHMARKS = ("training", "prepare", "score", "models", "tune", "elastic")
FAMILIES = ("feedforward", "autoencoders", "recurrent", "energy", "embeddings")


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conf", help="experiment YAML: overrides of the defaults (docs/configuration.md)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=0.01 (repeatable)")
    common.add_argument("--upstream", metavar="SUMMARY",
                        help="the JSON summary of the stage before (a file, or the JSON itself): its table versions "
                             "and model become this stage's inputs; --set wins over it")
    common.add_argument("--summary", help="write what the command produced as JSON to this path")
    common.add_argument("--summary-line", action="store_true",
                        help="print the summary as one compact JSON line last (Airflow pushes it to XCom)")
    parser = argparse.ArgumentParser(prog="dlpipe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True, metavar="command")
    cmds = {name: sub.add_parser(name, parents=[common], help=c.help, description=c.help) for name, c in COMMANDS.items()}
    cmds["tune"].add_argument("--space", required=True, help="the search space: a YAML file of config keys -> "
                              "{uniform|loguniform|int: [low, high]} or {choice: [values]} (docs/tuning.md)")
    cmds["bench"].add_argument("benchmark", choices=BENCHMARKS)
    cmds["bench"].add_argument("--family", choices=FAMILIES, default="feedforward", help="bench models: which family")
    cmds["lake"].add_argument("action", choices=("vacuum", "history"))
    cmds["lake"].add_argument("--table", required=True, help="the Delta table URI (path, file://, s3://, hdfs://)")
    cmds["lake"].add_argument("--retain-hours", type=int, help="vacuum: keep the files versions of the last N hours need")
    cmds["lake"].add_argument("--dry-run", action="store_true", help="vacuum: only list the files")
    cmds["models"].add_argument("action", choices=("describe", "rollback"))
    cmds["models"].add_argument("name", nargs="?", help="registered model name (default: registry.model_name)")
    cmds["words"].add_argument("action", choices=("similar", "analogy"))
    cmds["words"].add_argument("terms", nargs="*", metavar="WORD", help="analogy: A B C (A is to B as C is to ?)")
    cmds["words"].add_argument("--word", default="", help="similar: the word")
    cmds["words"].add_argument("--k", type=int, default=10, help="how many words")
    for name in ("explain", "embed", "anomalies", "generate", "recommend", "words"):
        cmds[name].add_argument("--model", default="", help="model URI (default models:/<registry.model_name>@champion)")
    for name in ("explain", "similar"):
        cmds[name].add_argument("--image", required=True, help="the image file (path or URI)")
    cmds["explain"].add_argument("--out", default="heatmap.png", help="where to write the heatmap PNG")
    cmds["similar"].add_argument("--k", type=int, default=10, help="how many nearest images")
    cmds["generate"].add_argument("--prompt", required=True, help="the text to continue")
    cmds["generate"].add_argument("--length", type=int, default=200, help="how many tokens (characters) to generate")
    cmds["generate"].add_argument("--temperature", type=float, default=1.0, help="0: the most likely token each step")
    cmds["generate"].add_argument("--seed", type=int, default=0, help="of the sampling")
    cmds["recommend"].add_argument("--user", default="", help="one user's recommendations (default: every user's, into a table)")
    cmds["recommend"].add_argument("--k", type=int, default=10, help="how many items per user")
    cmds["anomalies"].add_argument("--table", required=True, help="the table to rank: <uri> (its latest version) or <uri>@<version>")
    cmds["anomalies"].add_argument("--top", type=int, default=20, help="how many rows, largest error first")
    args = parser.parse_args(argv)
    if args.step == "lake" and args.action == "vacuum" and args.retain_hours is None:
        parser.error("`dlpipe lake vacuum` needs --retain-hours N")
    return args


def upstream_overrides(step: str, upstream: str, suffixes: dict[str, str] | None = None) -> list[str]:
    """`--set` items that make an upstream stage's summary this stage's inputs: its train/val/test
    tables (`suffixes`: split -> table, Config.model_table_suffixes) for train, retrain and embed; its
    run for evaluate; its model for score."""
    text = Path(upstream).read_text() if not upstream.lstrip().startswith("{") else upstream
    try:
        summary = json.loads(text)
    except ValueError:
        raise ConfigError(f"--upstream: expected a JSON summary (or a file holding one), got {upstream[:80]!r}") from None
    tables = summary.get("tables") or {}
    out = []
    names = suffixes or {s: s for s in SPLITS}
    if step in ("train", "retrain", "embed", "tune") and all(names[s] in tables for s in SPLITS):
        out.append("train.tables=" + json.dumps({s: f"{tables[names[s]]['uri']}@{tables[names[s]]['version']}"
                                                 for s in SPLITS}))
    if step == "evaluate" and summary.get("run_id"):
        out.append(f"evaluate.run_id={summary['run_id']}")
    if step == "score" and summary.get("model_uri"):
        out.append(f"score.model_uri={summary['model_uri']}")
    if not out:
        raise ConfigError(f"--upstream: a {summary.get('step', 'summary')!r} summary names no input of `dlpipe {step}`")
    return out


def main(argv: list[str] | None = None) -> int:
    """Runs one command; an expected failure is one line on stderr and its exit code (dlpipe.errors)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = COMMANDS[args.step]
    try:
        upstream = []
        if args.upstream:
            suffixes = load_config(args.conf, args.overrides).model_table_suffixes()
            upstream = upstream_overrides(args.step, args.upstream, suffixes)
        args.all_overrides = [*upstream, *args.overrides]
        cfg = load_config(args.conf, args.all_overrides)  # before Spark starts
        if command.trains:
            from dlpipe.launchers import check_backend

            check_backend(cfg.train.backend)
        if command.check:
            command.check(cfg, args)
        if command.tracking:
            from dlpipe.registry import check_reachable

            check_reachable(cfg.mlflow.tracking_uri)
        spark = _session(cfg, args.step) if command.spark else None
        summary = command.run(spark, cfg, args)
    except DlpipeError as exc:
        return _fail(exc, exc.exit_code)
    except FileNotFoundError as exc:  # the lake's "no Delta table at <uri>", a missing image file or bucket
        return _fail(exc, errors.EXIT_MISSING_INPUT)
    except OSError as exc:  # storage: access denied, an unreachable HDFS or S3 (dlpipe.storage.clear_error)
        return _fail(exc, errors.EXIT_ERROR)
    except (LookupError, TimeoutError, OSError, ValueError) as exc:
        if args.step not in ("lake", "models"):
            raise
        return _fail(exc, errors.EXIT_ERROR)  # no such version or alias, lock held: one line
    if command.spark:
        summary |= {"spark_master": spark.sparkContext.master, "spark_app_id": spark.sparkContext.applicationId}
    _print(args, summary)
    return errors.EXIT_OK


def _session(cfg: Config, step: str):
    from dlpipe.spark import get_session

    return get_session(cfg.spark.master, f"{cfg.spark.app_name}-{step}", cfg.spark.conf,
                       jars_dir=cfg.spark.jars_dir, engine=cfg.lake.engine)


def _print(args: argparse.Namespace, summary: dict) -> None:
    if args.step == "demo":
        from dlpipe.stages.demo import render

        print(render(summary), flush=True)
    elif args.step == "models" and args.action == "describe":
        from dlpipe.registry import render

        print(render(summary), flush=True)
    elif not args.summary_line:
        print(json.dumps(summary, indent=2, default=str), flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.summary_line:
        print(json.dumps(summary, default=str, separators=(",", ":")), flush=True)


def _fail(exc: BaseException, code: int) -> int:
    message = " ".join(str(exc).split())  # one line, whatever the message held
    kind = "config error" if isinstance(exc, ConfigError) else "error"
    print(f"dlpipe: {kind}: {message}", file=sys.stderr, flush=True)
    return code


def benchmark_module(name: str):
    """benchmarks.<name> from the checkout this dlpipe runs from (the benchmarks are not installed)."""
    import importlib

    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "benchmarks" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", f"benchmarks.{name}"):
            raise
        raise errors.InputNotFound(f"`dlpipe bench` runs from a dlpipe checkout (its benchmarks/ folder is not "
                                   f"installed); {checkout} has none") from None


if __name__ == "__main__":
    sys.exit(main())
