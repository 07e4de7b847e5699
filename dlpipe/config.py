"""The one typed configuration schema. Every default lives in these dataclasses; experiment files
(conf/*.yaml) hold only what they change and `--set section.key=value` overrides last. Each stage
receives only the sections it uses. Everything is validated before Spark starts, and every error
names the key (dlpipe.errors.ConfigError, exit code 2). `dlpipe config` prints the resolved config
and docs/configuration.md describes every key."""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dl.models import REGISTRY, TASKS
from dl.train import TrainConfig
from dlpipe import typed
from dlpipe.tuning import TuneConfig, validate_tune

CHECKOUT = Path(__file__).resolve().parent.parent  # where `make setup` puts .work/jars
from dlpipe.errors import ConfigError  # re-exported: callers import it from here

# the metrics evaluate logs for each model.task (test_roc_auc: two classes only); the first is registry.metric's auto
TASK_METRICS = {"classification": ("test_accuracy", "test_log_loss", "test_roc_auc"),
                "regression": ("test_r2", "test_mse", "test_mae"),
                "reconstruction": ("test_mse",),  # mean squared reconstruction error per value
                "clustering": ("test_qe",),  # mean quantization error of a self-organizing map
                "language_model": ("test_bpc",),  # bits per token (per character for data.text.unit: char)
                "recommendation": ("test_rmse", "test_mae"),  # over the held-out ratings of the test users
                "embedding": ("test_loss", "test_pair_accuracy")}  # word2vec's own objective on the test rows
FASHION_CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


@dataclass(frozen=True, kw_only=True)
class SparkConfig:
    master: str = "local[*]"  # ignored under spark-submit: its --master wins
    app_name: str = "dlpipe"
    # applied only where spark-submit --conf did not set the key; openCostInBytes 16 KiB: many small
    # raw files (one PNG per image) are packed thousands to a task instead of ~30
    conf: dict[str, str] = field(default_factory=lambda: {
        "spark.sql.shuffle.partitions": "8", "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.files.openCostInBytes": "16384", "spark.driver.memory": "4g",
        # prepare writes its staging folders (one per split) in one pass: one open file per split, no sort
        "spark.sql.maxConcurrentOutputFileWriters": "8",
        # a Delta snapshot replays the table's log in this many tasks: Delta's default of 50 cost 4-7 s
        # per read of a small table on 2 cores, 2 about 1 s (docs/performance.md); raise it for logs
        # of many thousands of files
        "spark.databricks.delta.snapshotPartitions": "2",
        # Delta's VACUUM lists the table's folders in this many tasks: Spark's default of 10000 made a
        # VACUUM of a 2-file table take 136 s on 2 cores, 8 tasks 5 s
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": "8"})
    jars_dir: str = ".work/jars"  # jars for spark.jars (delta-spark, hadoop-aws: deploy/jars/pom.xml); relative: to the checkout


@dataclass(frozen=True, kw_only=True)
class LakeConfig:
    # spark: delta-spark on the JVM; rs: delta-rs commits, no jars needed; auto: spark when its classes load
    engine: Literal["auto", "spark", "rs"] = "auto"


@dataclass(frozen=True, kw_only=True)
class PathsConfig:
    landing: str = "landing/fashion_mnist"  # raw files: images in one folder per class, or table files
    lake: str = "lake"  # Delta tables: <lake>/<data.name>_{train,val,test,rejected,predictions,...}


@dataclass(frozen=True, kw_only=True)
class TableDataConfig:
    """data.kind: table. CSV / JSON lines / Parquet rows with a declared label column."""
    format: Literal["csv", "jsonl", "parquet"] = "csv"  # csv with a header
    key: str = ""  # column with a unique row key; "" = <file>:<line>
    label: str = "label"
    task: Literal["classification", "regression"] = "classification"
    numeric: list[str] = field(default_factory=list)  # standardized with train-split mean/std
    categorical: list[str] = field(default_factory=list)  # one-hot over the train-split values
    classes: list[str] = field(default_factory=list)  # label values in label order; [] = sorted values seen


@dataclass(frozen=True, kw_only=True)
class RatingsDataConfig:
    """data.kind: ratings. (user, item, rating) rows."""
    format: Literal["csv", "jsonl", "parquet"] = "csv"
    user: str = "user"
    item: str = "item"
    rating: str = "rating"
    min_rating: float = 1.0
    max_rating: float = 5.0
    split_by: Literal["rating", "user"] = "rating"  # hash of user:item | of user (a user's ratings in one split)


@dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    """data.kind: text. Labelled documents (csv/jsonl/parquet) or a raw corpus (lines)."""
    format: Literal["csv", "jsonl", "parquet", "lines"] = "jsonl"  # lines: every non-blank line is a document
    encoding: str = "utf-8"  # of csv/jsonl/lines files
    key: str = ""  # "" = <file>:<line>
    text: str = "text"  # column with the text (ignored for format: lines)
    label: str = ""  # "" = unlabelled
    classes: list[str] = field(default_factory=list)  # [] = sorted label values seen
    lowercase: bool = True
    unit: Literal["word", "char"] = "word"  # tokens: words (\w+ runs) or every character (a character-level model)
    min_count: int = 2  # vocabulary: tokens seen at least this often in the train split
    max_vocab: int = 20000  # ... at most this many (plus <pad>=0 and <unk>=1)
    max_length: int = 128  # id sequences padded with 0 or truncated to this length


@dataclass(frozen=True, kw_only=True)
class TreesDataConfig:
    """data.kind: trees. Labelled bracketed trees (Penn / Stanford Sentiment Treebank format), one per line."""
    encoding: str = "utf-8"
    lowercase: bool = True  # the words at the leaves
    min_count: int = 1  # vocabulary: leaves seen at least this often in the train split
    max_vocab: int = 20000  # ... at most this many (plus <pad>=0 and <unk>=1)
    max_leaves: int = 64  # longer trees are rejected; every row is padded to 2 * max_leaves - 1 nodes
    classes: list[str] = field(default_factory=list)  # node labels in label order; [] = sorted labels seen
    split: Literal["hash", "files"] = "hash"  # hash of the key | the file name: train*, dev* or val*, test*


@dataclass(frozen=True, kw_only=True)
class TimeSeriesDataConfig:
    """data.kind: timeseries. (time, value) observations -> (history, horizon) windows."""
    format: Literal["csv", "jsonl", "parquet"] = "csv"
    time: str = "time"  # column: a number (e.g. a year) or a timestamp string
    value: str = "value"
    series: str = ""  # column naming the series; "" = one series
    history: int = 24
    horizon: int = 1
    stride: int = 1
    val_start: str = "1"  # windows wholly at/after this time are val, at/after test_start test,
    test_start: str = "2"  # wholly before val_start train; windows straddling a boundary are dropped


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    kind: Literal["images", "table", "ratings", "text", "timeseries", "trees"] = "images"
    mode: Literal["overwrite", "append", "merge"] = "overwrite"  # append: only new source files; merge: upsert by key
    dataset: str = ""  # `dlpipe land`: the packaged dataset to land ("" = the image demo data)
    land_shards: int = 4  # `dlpipe land`: files to split a dataset into
    name: str = "fashion_mnist"  # table name prefix: <lake>/<name>_train, ...
    classes: list[str] = field(default_factory=lambda: list(FASHION_CLASSES))  # class folder names, in label order
    image_size: int = 28
    channels: int = 1
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    land_limit_per_class: int = 0  # land-demo-data: images per class to land, 0 = all
    max_rejected_fraction: float = 0.01  # prepare fails, writing no new train/val/test version, above this
    select_classes: list[str] = field(default_factory=list)  # train/evaluate on these only (relabelled 0..k-1)
    label_fraction: float = 1.0  # keep this fraction of the training rows (stable hash of the key)
    table: TableDataConfig = field(default_factory=TableDataConfig)
    ratings: RatingsDataConfig = field(default_factory=RatingsDataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    timeseries: TimeSeriesDataConfig = field(default_factory=TimeSeriesDataConfig)
    trees: TreesDataConfig = field(default_factory=TreesDataConfig)


# model.name picks one registered model (dl/models/<name>.py); its hyperparameters are validated
# against that model's own config dataclass under model.<name>, with that dataclass's defaults.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("name", Literal[tuple(REGISTRY)], field(default="cnn")),
     ("task", Literal[TASKS], field(default="classification")),
     *[(n, spec.config, field(default_factory=spec.config)) for n, spec in REGISTRY.items()]],
    frozen=True, kw_only=True,
)


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    model_name: str = "fashion_cnn"
    min_accuracy: float = 0.85  # evaluate, first retrain: champion only at or above this test accuracy
    # retrain compares challenger and champion on this; auto = test_accuracy (classification) or test_r2 (regression)
    metric: Literal["auto", "test_accuracy", "test_log_loss", "test_roc_auc", "test_r2", "test_mse", "test_mae",
                    "test_qe", "test_rmse"] = "auto"
    min_improvement: float = 0.005  # retrain promotes a challenger only if it beats the champion by at least this
    lock_ttl_s: int = 1800  # a promotion lock older than this was left by a crashed job and is broken
    lock_wait_s: int = 600  # how long a job waits for the promotion lock before failing


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "dlpipe"


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    run_id: str = ""  # "" = the latest finished training run of this experiment and model


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    model_uri: str = ""  # "" = models:/<registry.model_name>@champion, resolved once to its version
    # the table to score: "" = the test table the model's lineage names (else the latest <name>_test),
    # <uri> = its latest version, <uri>@<version> = that version
    input: str = ""
    batch_size: int = 1024
    run_date: str = ""  # YYYY-MM-DD the predictions are for; "" = today (UTC). Rerun = same slice replaced


@dataclass(frozen=True, kw_only=True)
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def table_uri(self, suffix: str) -> str:
        return table_uri(self.paths, self.data, suffix)

    def model_table_suffixes(self) -> dict[str, str]:
        """split -> the suffix of the table a model reads by default: <split>; for a recommender the
        per-user rating vectors vectors_<split>; for an item-based one (AutoRec, RBM) the per-item vectors
        item_vectors_train/_val to train on, and vectors_test (per user, as it is served) to evaluate on."""
        if self.model.task != "recommendation":
            return {split: split for split in ("train", "val", "test")}
        if getattr(getattr(self.model, self.model.name, None), "based", "user") == "item":
            return {"train": "item_vectors_train", "val": "item_vectors_val", "test": "vectors_test"}
        return {split: "vectors_" + split for split in ("train", "val", "test")}

    def model_tables(self) -> dict[str, str]:
        """The train/val/test tables a model reads by default (model_table_suffixes)."""
        return {split: self.table_uri(suffix) for split, suffix in self.model_table_suffixes().items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def table_uri(paths: PathsConfig, data: DataConfig, suffix: str) -> str:
    """<paths.lake>/<data.name>_<suffix>: where prepare writes and the stages read by default."""
    return f"{paths.lake.rstrip('/')}/{data.name}_{suffix}"


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- experiment file <- `key=value` overrides, then typed validation."""
    return from_raw(raw_config(path, overrides))


def from_raw(raw: dict) -> Config:
    """A validated Config from a nested mapping of the keys set (raw_config's, or Config.to_dict())."""
    return _resolve_paths(typed.build(Config, raw, prefix=""))


def raw_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """What the experiment file and the overrides set, as one nested mapping (before the defaults)."""
    raw: dict = {}
    if path is not None:
        typed.merge(raw, _read_yaml(Path(path)))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
        typed.merge(raw, typed.nest(typed.split_key(Config, key.strip()), yaml.safe_load(value)))
    return raw


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


def _validate_elastic(train) -> None:
    if not train.elastic:
        return
    if train.backend != "horovod":
        raise ConfigError(f"config key 'train.elastic': elastic training needs train.backend=horovod, got "
                          f"{train.backend} (TorchDistributor fails fast and `train.resume: auto` continues the run)")
    low, high = train.min_workers or train.num_workers, train.max_workers or train.num_workers
    if not 1 <= low <= train.num_workers <= high:
        raise ConfigError(f"config key 'train.min_workers': expected 1 <= min_workers <= num_workers <= max_workers, "
                          f"got {low} <= {train.num_workers} <= {high}")
    for key in ("commit_every", "elastic_timeout_s"):
        if getattr(train, key) <= 0:
            raise ConfigError(f"config key 'train.{key}': expected a positive integer, got {getattr(train, key)}")


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
    _validate_elastic(cfg.train)
    # a model with train_epoch takes its epochs itself, unless its config says otherwise (word2vec's update)
    own_epochs = getattr(getattr(cfg.model, cfg.model.name, None), "trains_itself",
                         hasattr(REGISTRY[cfg.model.name].build, "train_epoch"))
    if cfg.train.elastic and own_epochs:
        raise ConfigError(f"config key 'train.elastic': model {cfg.model.name} trains whole epochs itself; elastic "
                          "training needs a model trained by gradient steps" +
                          (" (model.word2vec.update: batches)" if cfg.model.name == "word2vec" else ""))
    if cfg.model.name == "word2vec" and own_epochs and cfg.train.use_gpu is True:
        raise ConfigError("config key 'train.use_gpu': model.word2vec.update: pairs trains on the CPU; "
                          "use update: batches on a GPU")
    if cfg.train.lr <= 0:
        raise ConfigError(f"config key 'train.lr': expected a positive number, got {cfg.train.lr}")
    if cfg.train.clip_grad_norm < 0:
        raise ConfigError(f"config key 'train.clip_grad_norm': expected a non-negative number (0 = off), got {cfg.train.clip_grad_norm}")
    _validate_sequence_model(cfg)
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
    if cfg.train.pretrain_epochs <= 0:
        raise ConfigError(f"config key 'train.pretrain_epochs': expected a positive integer, got {cfg.train.pretrain_epochs}")
    if cfg.train.pretrain == "greedy" and not hasattr(REGISTRY[cfg.model.name].build, "set_pretraining"):
        layered = [n for n, spec in REGISTRY.items() if hasattr(spec.build, "set_pretraining")]
        raise ConfigError(f"config key 'train.pretrain': greedy pretraining needs a model with layers to pretrain "
                          f"({', '.join(layered)}), got model.name={cfg.model.name}")
    if cfg.train.freeze != "none" and not cfg.train.init_from:
        raise ConfigError("config key 'train.freeze': freezing needs pretrained weights; set train.init_from")
    if not 0 <= cfg.data.max_rejected_fraction <= 1:
        raise ConfigError(f"config key 'data.max_rejected_fraction': expected a number in [0, 1], got {cfg.data.max_rejected_fraction}")
    if not 0 <= cfg.registry.min_accuracy <= 1:
        raise ConfigError(f"config key 'registry.min_accuracy': expected a number in [0, 1], got {cfg.registry.min_accuracy}")
    metric = cfg.registry.metric
    if metric != "auto" and metric not in TASK_METRICS[cfg.model.task]:
        raise ConfigError(f"config key 'registry.metric': a {cfg.model.task} model is evaluated on "
                          f"{list(TASK_METRICS[cfg.model.task])} (or auto), got {metric!r}")
    n_classes = len(cfg.data.select_classes or names)
    if metric == "test_roc_auc" and n_classes != 2 and n_classes:
        raise ConfigError(f"config key 'registry.metric': test_roc_auc needs exactly two classes, got {n_classes}")
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
    tables = cfg.train.tables
    if tables and sorted(tables) != ["test", "train", "val"]:
        raise ConfigError(f"config key 'train.tables': expected {{train: <uri>[@<version>], val: ..., test: ...}} "
                          f"(all three) or {{}} (the newest set one prepare job wrote), got keys {sorted(tables)}")
    for key, spec in [*((f"train.tables.{k}", v) for k, v in tables.items()), ("score.input", cfg.score.input)]:
        if spec != spec.strip() or (key != "score.input" and not spec):
            raise ConfigError(f"config key '{key}': expected <table uri> or <table uri>@<version>, got {spec!r}")
    if len(cfg.data.classes) < 2 or len(set(cfg.data.classes)) != len(cfg.data.classes):
        raise ConfigError("config key 'data.classes': expected at least two distinct class folder names")
    _validate_data_kind(cfg.data)
    validate_tune(cfg.tune, cfg.model.task)


def _validate_sequence_model(cfg: Config) -> None:
    """Which data a task of a sequence model needs (text -> classification, language_model or
    embedding, timeseries -> regression), and which models read those kinds."""
    kind, task = cfg.data.kind, cfg.model.task
    sequence_kind = kind in ("text", "timeseries")
    takes_sequences = bool({"text", "series"} & set(REGISTRY[cfg.model.name].inputs))
    if takes_sequences and not sequence_kind:
        raise ConfigError(f"config key 'data.kind': model {cfg.model.name} reads text or timeseries data, got {kind!r}")
    if takes_sequences and sequence_kind:
        wanted = {"text": ("classification", "language_model", "embedding"), "timeseries": ("regression",)}[kind]
        if task not in wanted:
            raise ConfigError(f"config key 'model.task': on data.kind={kind} expected one of {list(wanted)}, got {task!r}")
        if task == "classification" and not cfg.data.text.label:
            raise ConfigError("config key 'model.task': classification needs labelled text (data.text.label), got ''")
    if ("trees" in REGISTRY[cfg.model.name].inputs) != (kind == "trees"):
        readers = [n for n, spec in REGISTRY.items() if "trees" in spec.inputs]
        raise ConfigError(f"config key 'data.kind': model {cfg.model.name} reads trees (data.kind: trees), got {kind!r}"
                          if kind != "trees" else f"config key 'model.name': data.kind=trees is read by {readers}, got {cfg.model.name!r}")
    if kind == "trees" and task != "classification":
        raise ConfigError(f"config key 'model.task': on data.kind=trees expected classification, got {task!r}")
    if "ratings" in REGISTRY[cfg.model.name].inputs and kind != "ratings":
        raise ConfigError(f"config key 'data.kind': model {cfg.model.name} reads rating vectors (data.kind: ratings), got {kind!r}")
    if "ratings" in REGISTRY[cfg.model.name].inputs and cfg.data.ratings.min_rating <= 0:
        raise ConfigError(f"config key 'data.ratings.min_rating': a recommender reads 0 as unrated: expected a rating "
                          f"above 0, got {cfg.data.ratings.min_rating:g}")
    if task == "language_model" and cfg.model.name == "rnn" and cfg.model.rnn.bidirectional:
        raise ConfigError("config key 'model.rnn.bidirectional': a language model reads left to right: expected false")


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
    elif data.kind in ("text", "trees"):
        t, section = getattr(data, data.kind), f"data.{data.kind}"
        for key in ("min_count", "max_vocab", "max_length" if data.kind == "text" else "max_leaves"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"config key '{section}.{key}': expected a positive integer, got {getattr(t, key)}")
        if data.kind == "text" and t.format != "lines" and not t.text:
            raise ConfigError("config key 'data.text.text': expected the name of the text column, got ''")
        try:
            "".encode(t.encoding)
        except LookupError:
            raise ConfigError(f"config key '{section}.encoding': expected a Python codec name, got {t.encoding!r}") from None
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
        jars_dir = str(CHECKOUT / jars_dir)
    metric = TASK_METRICS[cfg.model.task][0] if cfg.registry.metric == "auto" else cfg.registry.metric
    return dataclasses.replace(
        cfg,
        spark=dataclasses.replace(cfg.spark, jars_dir=jars_dir),
        registry=dataclasses.replace(cfg.registry, metric=metric),
        paths=PathsConfig(landing=_absolute_uri(cfg.paths.landing), lake=_absolute_uri(cfg.paths.lake)),
        train=dataclasses.replace(cfg.train, checkpoint_uri=_absolute_uri(cfg.train.checkpoint_uri),
                                  run_name=cfg.train.run_name or cfg.registry.model_name),
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=tracking, artifact_root=_absolute_uri(cfg.mlflow.artifact_root)),
    )
