"""Typed configuration: conf/base.yaml holds every default, experiment files hold overrides,
`--set section.key=value` overrides last. Everything is validated before Spark starts."""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dl.models import REGISTRY, TASKS, ParamError

BASE_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "base.yaml"


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what was expected."""


@dataclass(frozen=True, kw_only=True)
class SparkConfig:
    master: str
    app_name: str
    conf: dict[str, str]
    jars_dir: str = ".work/jars"  # jars added to spark.jars (delta-spark, hadoop-aws: deploy/jars/pom.xml)


@dataclass(frozen=True, kw_only=True)
class LakeConfig:
    # spark: delta-spark on the JVM; rs: delta-rs commits, no jars needed; auto: spark when its classes load
    engine: Literal["auto", "spark", "rs"] = "auto"


@dataclass(frozen=True, kw_only=True)
class PathsConfig:
    landing: str  # raw files, one folder per class
    lake: str  # Delta tables live under this URI


@dataclass(frozen=True, kw_only=True)
class TableDataConfig:
    """data.kind: table. CSV / JSON lines / Parquet rows with a declared label column."""
    format: Literal["csv", "jsonl", "parquet"]
    key: str  # column with a unique row key; "" = <file>:<line>
    label: str
    task: Literal["classification", "regression"]
    numeric: list[str]  # standardized with train-split statistics
    categorical: list[str]  # one-hot with a train-split vocabulary
    classes: list[str]  # classification label values in label order; [] = sorted values seen


@dataclass(frozen=True, kw_only=True)
class RatingsDataConfig:
    """data.kind: ratings. (user, item, rating) rows."""
    format: Literal["csv", "jsonl", "parquet"]
    user: str
    item: str
    rating: str
    min_rating: float
    max_rating: float
    split_by: Literal["rating", "user"]


@dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    """data.kind: text. Labelled documents (csv/jsonl/parquet) or a raw corpus (lines)."""
    format: Literal["csv", "jsonl", "parquet", "lines"]
    encoding: str  # of csv/jsonl/lines files
    key: str  # "" = <file>:<line>
    text: str  # column with the text (ignored for format: lines)
    label: str  # "" = unlabelled
    classes: list[str]  # [] = sorted label values seen
    lowercase: bool
    min_count: int  # vocabulary: tokens seen at least this often in the train split
    max_vocab: int  # ... at most this many (plus <pad>=0 and <unk>=1)
    max_length: int  # id sequences padded with 0 or truncated to this length


@dataclass(frozen=True, kw_only=True)
class TimeSeriesDataConfig:
    """data.kind: timeseries. (time, value) observations -> (history, horizon) windows."""
    format: Literal["csv", "jsonl", "parquet"]
    time: str  # column: a number (e.g. a year) or a timestamp string
    value: str
    series: str  # column naming the series; "" = one series
    history: int
    horizon: int
    stride: int
    val_start: str  # windows wholly at/after this time are val, at/after test_start test,
    test_start: str  # wholly before val_start train; windows straddling a boundary are dropped


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    kind: Literal["images", "table", "ratings", "text", "timeseries"]
    mode: Literal["overwrite", "append", "merge"]  # append: only new source files; merge: upsert by key
    dataset: str  # `dlpipe land`: the packaged dataset to land ("" = the image demo data)
    land_shards: int  # `dlpipe land`: files to split a dataset into
    name: str  # table name prefix: <lake>/<name>_train, ...
    classes: list[str]  # class folder names, in label order
    image_size: int
    channels: int
    split_fractions: dict[str, float]  # train/val/test; assigned from a hash of the file path
    land_limit_per_class: int  # land-demo-data: images per class to land, 0 = all
    max_rejected_fraction: float  # prepare fails, writing no new train/val/test version, above this
    select_classes: list[str]  # train/evaluate on these classes only (relabelled 0..k-1); [] = all
    label_fraction: float  # keep this fraction of the training rows (stable hash of the key); 1.0 = all
    table: TableDataConfig
    ratings: RatingsDataConfig
    text: TextDataConfig
    timeseries: TimeSeriesDataConfig


# model.name picks one registered model (dl/models/<name>.py); its hyperparameters are validated
# against that model's own config dataclass under model.<name>.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("name", Literal[tuple(REGISTRY)]), ("task", Literal[TASKS]), *[(n, spec.config) for n, spec in REGISTRY.items()]],
    frozen=True, kw_only=True,
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    backend: Literal["horovod", "torch_distributor", "local"]
    num_workers: int
    use_gpu: Literal["auto", True, False]
    precision: Literal["fp32", "bf16", "fp16"]
    sync: Literal["allreduce", "average"]
    average_every: int  # local steps between parameter averages (sync: average)
    epochs: int
    batch_size: int  # per worker
    optimizer: Literal["adam", "sgd"]
    momentum: float
    lr: float
    lr_schedule: Literal["constant", "cosine"]
    lr_scaling: Literal["none", "linear"]
    warmup_epochs: int
    weight_decay: float
    shuffle: bool
    seed: int
    max_rows: int  # 0 = every row of the pinned train table (tests use small slices)
    run_name: str  # checkpoints and resume are per run name; "" = registry.model_name
    checkpoint_uri: str
    checkpoint_every: int  # epochs; 0 = no checkpoints
    resume: Literal["auto", "never"]
    init_from: str  # "" or models:/<name>@<alias> (or /<version>): start from its weights, new head
    freeze: Literal["none", "features"]  # features: only the head is trained


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    model_name: str
    min_accuracy: float  # the new version becomes `champion` only at or above this test accuracy
    metric: Literal["test_accuracy", "test_log_loss", "test_roc_auc", "test_r2", "test_mse", "test_mae"]  # retrain compares challenger and champion on this
    min_improvement: float  # retrain promotes a challenger only if it beats the champion by at least this
    lock_ttl_s: int  # a promotion lock older than this was left by a crashed job and is broken
    lock_wait_s: int  # how long a job waits for the promotion lock before failing


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    tracking_uri: str
    artifact_root: str
    experiment: str


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    run_id: str  # "" = the latest finished training run of this experiment and model


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    model_uri: str  # "" = models:/<registry.model_name>@champion
    batch_size: int
    run_date: str  # YYYY-MM-DD the predictions are for; "" = today (UTC). Rerun = same slice replaced


@dataclass(frozen=True, kw_only=True)
class Config:
    spark: SparkConfig
    paths: PathsConfig
    lake: LakeConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    registry: RegistryConfig
    mlflow: MlflowConfig
    evaluate: EvaluateConfig
    score: ScoreConfig

    def table_uri(self, suffix: str) -> str:
        return f"{self.paths.lake.rstrip('/')}/{self.data.name}_{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: Path = BASE_CONFIG) -> Config:
    """base.yaml <- experiment file <- `key=value` overrides, then typed validation."""
    raw = _read_yaml(base)
    if path is not None:
        _merge(raw, _read_yaml(Path(path)))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
        _merge(raw, _nest(_split_key(key.strip()), yaml.safe_load(value)))
    cfg = _build(Config, raw, prefix="")
    return _resolve_paths(cfg)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def _split_key(dotted: str) -> list[str]:
    """`spark.conf.spark.ui.enabled` -> ["spark", "conf", "spark.ui.enabled"]: below a free-form
    mapping (such as Spark settings) the rest of the key is one name."""
    parts, cls = dotted.split("."), Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        tp = hints.get(part)
        if typing.get_origin(tp) is dict:
            return parts[: i + 1] + ([".".join(parts[i + 1 :])] if i + 1 < len(parts) else [])
        if tp is None or not dataclasses.is_dataclass(tp):
            return parts
        cls = tp
    return parts


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where}': expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (expected one of: {', '.join(sorted(fields))})"
        )
    optional = {f.name for f in fields.values()
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    missing = sorted(set(fields) - set(raw) - optional)
    if missing:
        raise ConfigError(f"missing config key '{prefix}{missing[0]}'")
    try:
        return cls(**{name: _check(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw})
    except ParamError as exc:  # a model's own check of its hyperparameters
        raise ConfigError(f"config key '{prefix}{exc.field}': {exc.message}") from None


def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        if val_tp is str:  # free-form settings such as Spark conf: scalars become strings
            return {str(k): _scalar_str(v, f"{key}.{k}") for k, v in value.items()}
        return {str(k): _check(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-01-02 as a date
            value = value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module, not user input


def _scalar_str(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"config key '{key}': expected a scalar value, got {value!r}")


def _validate(cfg: Config) -> None:
    fractions = cfg.data.split_fractions
    if sorted(fractions) != ["test", "train", "val"]:
        raise ConfigError(
            f"config key 'data.split_fractions': expected exactly train, val and test, got {sorted(fractions)}"
        )
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ConfigError(f"config key 'data.split_fractions': expected non-negative fractions summing to 1, got {fractions}")
    positive = {
        "train.average_every": cfg.train.average_every,
        "data.image_size": cfg.data.image_size,
        "data.channels": cfg.data.channels,
        "train.num_workers": cfg.train.num_workers,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "score.batch_size": cfg.score.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}': expected a positive integer, got {value}")
    for key, value in {"train.warmup_epochs": cfg.train.warmup_epochs, "train.checkpoint_every": cfg.train.checkpoint_every,
                       "train.max_rows": cfg.train.max_rows}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}': expected a non-negative integer, got {value}")
    if cfg.train.warmup_epochs >= cfg.train.epochs and cfg.train.warmup_epochs:
        raise ConfigError(f"config key 'train.warmup_epochs': expected fewer than train.epochs={cfg.train.epochs}, got {cfg.train.warmup_epochs}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"config key 'train.lr': expected a positive number, got {cfg.train.lr}")
    if cfg.model.task not in REGISTRY[cfg.model.name].tasks:
        raise ConfigError(f"config key 'model.task': model {cfg.model.name} supports {list(REGISTRY[cfg.model.name].tasks)}, "
                          f"got {cfg.model.task!r}")
    names = cfg.data.table.classes if cfg.data.kind == "table" else cfg.data.classes
    unknown = [c for c in cfg.data.select_classes if c not in names]
    if unknown or (cfg.data.select_classes and len(set(cfg.data.select_classes)) < 2):
        raise ConfigError(f"config key 'data.select_classes': expected at least two of data.classes, got {cfg.data.select_classes}")
    if not 0 < cfg.data.label_fraction <= 1:
        raise ConfigError(f"config key 'data.label_fraction': expected a number in (0, 1], got {cfg.data.label_fraction}")
    if cfg.train.init_from and not cfg.train.init_from.startswith("models:/"):
        raise ConfigError(f"config key 'train.init_from': expected models:/<name>@<alias> or models:/<name>/<version>, "
                          f"got {cfg.train.init_from!r}")
    if cfg.train.freeze != "none" and not cfg.train.init_from:
        raise ConfigError("config key 'train.freeze': freezing needs pretrained weights; set train.init_from")
    if not 0 <= cfg.data.max_rejected_fraction <= 1:
        raise ConfigError(f"config key 'data.max_rejected_fraction': expected a number in [0, 1], got {cfg.data.max_rejected_fraction}")
    if not 0 <= cfg.registry.min_accuracy <= 1:
        raise ConfigError(f"config key 'registry.min_accuracy': expected a number in [0, 1], got {cfg.registry.min_accuracy}")
    if cfg.registry.min_improvement < 0:
        raise ConfigError(f"config key 'registry.min_improvement': expected a non-negative number, got {cfg.registry.min_improvement}")
    for key, value in {"registry.lock_ttl_s": cfg.registry.lock_ttl_s, "registry.lock_wait_s": cfg.registry.lock_wait_s}.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}': expected a positive integer, got {value}")
    if cfg.score.run_date:
        try:
            datetime.date.fromisoformat(cfg.score.run_date)
        except ValueError:
            raise ConfigError(f"config key 'score.run_date': expected YYYY-MM-DD or \"\", got {cfg.score.run_date!r}") from None
    if len(cfg.data.classes) < 2 or len(set(cfg.data.classes)) != len(cfg.data.classes):
        raise ConfigError("config key 'data.classes': expected at least two distinct class folder names")
    _validate_data_kind(cfg.data)


def _validate_data_kind(data: DataConfig) -> None:
    if data.land_shards <= 0:
        raise ConfigError(f"config key 'data.land_shards': expected a positive integer, got {data.land_shards}")
    from dlpipe.datasets import DATASETS

    if data.dataset and data.dataset not in DATASETS:
        raise ConfigError(f"config key 'data.dataset': expected one of {list(DATASETS)} (or \"\"), got {data.dataset!r}")
    if data.kind == "table":
        t = data.table
        if not t.label:
            raise ConfigError("config key 'data.table.label': expected the name of the label column, got ''")
        if not t.numeric and not t.categorical:
            raise ConfigError("config keys 'data.table.numeric' and 'data.table.categorical': expected at least one feature column")
        columns = [t.label, *t.numeric, *t.categorical] + ([t.key] if t.key else [])
        if len(set(columns)) != len(columns):
            raise ConfigError(f"config keys 'data.table.{{key,label,numeric,categorical}}': expected distinct columns, got {columns}")
    elif data.kind == "ratings":
        r = data.ratings
        if len({r.user, r.item, r.rating}) != 3 or not all((r.user, r.item, r.rating)):
            raise ConfigError(f"config keys 'data.ratings.{{user,item,rating}}': expected three distinct column names, got {[r.user, r.item, r.rating]}")
        if r.min_rating >= r.max_rating:
            raise ConfigError(f"config key 'data.ratings.max_rating': expected more than min_rating={r.min_rating}, got {r.max_rating}")
    elif data.kind == "text":
        t = data.text
        for key in ("min_count", "max_vocab", "max_length"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"config key 'data.text.{key}': expected a positive integer, got {getattr(t, key)}")
        if t.format != "lines" and not t.text:
            raise ConfigError("config key 'data.text.text': expected the name of the text column, got ''")
        try:
            "".encode(t.encoding)
        except LookupError:
            raise ConfigError(f"config key 'data.text.encoding': expected a Python codec name, got {t.encoding!r}") from None
    elif data.kind == "timeseries":
        t = data.timeseries
        for key in ("history", "horizon", "stride"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"config key 'data.timeseries.{key}': expected a positive integer, got {getattr(t, key)}")
        if not t.time or not t.value:
            raise ConfigError("config keys 'data.timeseries.time' and 'data.timeseries.value': expected column names")
        from pipelines.records import parse_time  # the one parser of times, shared with the pipeline

        bounds = {}
        for key in ("val_start", "test_start"):
            try:
                bounds[key] = parse_time(getattr(t, key))
            except ValueError:
                raise ConfigError(f"config key 'data.timeseries.{key}': expected a number or a timestamp, got {getattr(t, key)!r}") from None
        if bounds["val_start"] >= bounds["test_start"]:
            raise ConfigError(f"config key 'data.timeseries.test_start': expected a time after val_start={t.val_start!r}, got {t.test_start!r}")


def _absolute_uri(uri: str) -> str:
    """Relative local paths become absolute, so executors and later steps agree on them."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def _resolve_paths(cfg: Config) -> Config:
    _validate(cfg)
    tracking = cfg.mlflow.tracking_uri
    if tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////"):
        tracking = "sqlite:///" + str(Path(tracking[len("sqlite:///"):]).resolve())
    jars_dir = cfg.spark.jars_dir  # relative: to the checkout (where `make setup` puts them)
    if jars_dir and "://" not in jars_dir and not Path(jars_dir).is_absolute():
        jars_dir = str(BASE_CONFIG.parent.parent / jars_dir)
    return dataclasses.replace(
        cfg,
        spark=dataclasses.replace(cfg.spark, jars_dir=jars_dir),
        paths=PathsConfig(landing=_absolute_uri(cfg.paths.landing), lake=_absolute_uri(cfg.paths.lake)),
        train=dataclasses.replace(cfg.train, checkpoint_uri=_absolute_uri(cfg.train.checkpoint_uri),
                                  run_name=cfg.train.run_name or cfg.registry.model_name),
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=tracking, artifact_root=_absolute_uri(cfg.mlflow.artifact_root)),
    )
