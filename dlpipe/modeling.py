"""Driver-side glue between the config, the model registry (dl.models) and the tables: which net
to build for a table, which labels a run sees, the fit settings, pretrained weights."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dl.models import REGISTRY, Net
from dl.train import FitConfig
from dlpipe import lake
from dlpipe.config import Config
from dlpipe.errors import InputNotFound


def class_names(cfg: Config) -> list[str]:
    """Label names in label order: image class folders, or data.table.classes for tables."""
    if cfg.data.kind != "table":
        return list(cfg.data.classes)
    if cfg.model.task != cfg.data.table.task:
        raise ValueError(f"model.task={cfg.model.task} but the table's labels are for {cfg.data.table.task} (data.table.task)")
    if cfg.model.task == "classification" and len(cfg.data.table.classes) < 2:
        raise ValueError("data.table.classes is empty: a classifier needs the class names in label order")
    return list(cfg.data.table.classes)


def label_view(cfg: Config) -> tuple[list[str], tuple[int, ...]]:
    """(class names this run trains on, their original label ids or () for all classes)."""
    names = class_names(cfg)
    if not cfg.data.select_classes:
        return names, ()
    return list(cfg.data.select_classes), tuple(names.index(c) for c in cfg.data.select_classes)


def relabel(df: DataFrame, ids: tuple[int, ...]) -> DataFrame:
    """Rows of the selected classes only, labels renumbered 0..k-1 in data.select_classes order."""
    if not ids:
        return df
    mapping = F.create_map(*[F.lit(v) for new, old in enumerate(ids) for v in (old, new)])
    return df.where(F.col("label").isin(list(ids))).withColumn("label", mapping[F.col("label")].cast("int"))


def input_of(spark: SparkSession, uri: str, version: int, cfg: Config) -> tuple[str, tuple[int, ...]]:
    """(input column, shape of one example): images carry `pixels`, tables carry `features`."""
    columns = lake.read_table(spark, uri, version).columns
    if "pixels" in columns:
        return "pixels", (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if "features" in columns:
        n = lake.read_table(spark, uri, version).select(F.size("features").alias("n")).first()
        if n is None:
            raise ValueError(f"{uri}@{version} is empty: cannot tell how many features a row has")
        return "features", (int(n["n"]),)
    raise ValueError(f"{uri}@{version} has neither a `pixels` nor a `features` column (columns: {columns})")


def net_for(cfg: Config, input_column: str, input_shape: tuple[int, ...], num_classes: int) -> Net:
    spec = REGISTRY[cfg.model.name]
    kind = "image" if input_column == "pixels" else "table"
    if kind not in spec.inputs:
        raise ValueError(f"model.name={cfg.model.name} takes {' or '.join(spec.inputs)} input; "
                         f"data.name={cfg.data.name} is a {kind} table")
    return Net(name=cfg.model.name, params=getattr(cfg.model, cfg.model.name), input_shape=tuple(input_shape),
               num_outputs=num_classes if cfg.model.task == "classification" else 1, task=cfg.model.task)


def image_net(cfg: Config) -> Net:
    """The configured model for the configured image data (no table needed)."""
    return net_for(cfg, "pixels", (cfg.data.channels, cfg.data.image_size, cfg.data.image_size), len(label_view(cfg)[0]))


def fit_config(cfg: Config) -> FitConfig:
    t = cfg.train
    return FitConfig(
        epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer, momentum=t.momentum,
        weight_decay=t.weight_decay, lr_schedule=t.lr_schedule, lr_scaling=t.lr_scaling,
        warmup_epochs=t.warmup_epochs, sync=t.sync, average_every=t.average_every, shuffle=t.shuffle,
        precision=t.precision, checkpoint_every=t.checkpoint_every, seed=t.seed, task=cfg.model.task, freeze=t.freeze,
    )


def resolve(model_uri: str) -> str:
    """models:/<name>@<alias> -> models:/<name>/<version> (what an alias points at now)."""
    if "@" not in model_uri:
        return model_uri
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    except Exception:
        raise InputNotFound(f"{model_uri} does not resolve: no version of {name!r} has alias {alias!r}") from None
    return f"models:/{name}/{version}"


def pretrained_state(model_uri: str, net: Net) -> dict:
    """Every weight but the head's from a registered model built like `net` (train.init_from)."""
    from dlpipe.tracking import load_net

    module, meta = load_net(model_uri)
    src = meta["net_obj"]
    if (src.name, src.params, tuple(src.input_shape)) != (net.name, net.params, tuple(net.input_shape)):
        raise ValueError(
            f"train.init_from={model_uri} is a {src.name} {src.params} on input {tuple(src.input_shape)}; this run "
            f"trains a {net.name} {net.params} on input {tuple(net.input_shape)}: they must match (only the head is replaced)")
    return {k: v for k, v in module.state_dict().items() if not k.startswith("head.")}
