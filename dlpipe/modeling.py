"""Driver-side glue between the config sections, the model registry (dl.models) and the tables:
which net to build for a table, which labels a run sees, pretrained weights."""

from __future__ import annotations

import re

import numpy as np
from mlflow.tracking import MlflowClient
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dl.models import REGISTRY, Net
from dlpipe import lake
from dlpipe.config import DataConfig, ModelConfig
from dlpipe.errors import InputNotFound
from dlpipe.refs import TableRef


def class_names(data: DataConfig, task: str) -> list[str]:
    """Label names in label order: image class folders, or data.table.classes for tables."""
    if data.kind in ("text", "timeseries", "ratings", "trees"):
        return []  # a sequence model's classes come from the vocabulary table (sequence_setup); ratings have none
    if data.kind != "table":
        return list(data.classes)
    if task in ("reconstruction", "clustering"):  # no target: the labels only colour plots
        return list(data.table.classes)
    if task != data.table.task:
        raise ValueError(f"model.task={task} but the table's labels are for {data.table.task} (data.table.task)")
    if task == "classification" and len(data.table.classes) < 2:
        raise ValueError("data.table.classes is empty: a classifier needs the class names in label order")
    return list(data.table.classes)


def label_view(data: DataConfig, task: str) -> tuple[list[str], tuple[int, ...]]:
    """(class names this run trains on, their original label ids or () for all classes)."""
    names = class_names(data, task)
    if not data.select_classes:
        return names, ()
    return list(data.select_classes), tuple(names.index(c) for c in data.select_classes)


def relabel(df: DataFrame, ids: tuple[int, ...]) -> DataFrame:
    """Rows of the selected classes only, labels renumbered 0..k-1 in data.select_classes order."""
    if not ids:
        return df
    mapping = F.create_map(*[F.lit(v) for new, old in enumerate(ids) for v in (old, new)])
    return df.where(F.col("label").isin(list(ids))).withColumn("label", mapping[F.col("label")].cast("int"))


INPUT_KINDS = {"pixels": "image", "features": "table", "ids": "text", "history": "series",
               "ratings": "ratings", "nodes": "trees"}  # column -> ModelSpec.inputs


def input_of(spark: SparkSession, table: TableRef, data: DataConfig) -> tuple[str, tuple[int, ...]]:
    """(input column, shape of one example): images carry `pixels`, tables `features`, text tables
    `ids` (token ids padded to data.text.max_length), time-series windows `history`, rating vectors
    `ratings` (one value per item), tree tables `nodes` (dl.bracketed.encode)."""
    frame = lake.read_table(spark, table.uri, table.version)
    if "pixels" in frame.columns:
        return "pixels", (data.channels, data.image_size, data.image_size)
    for column in ("features", "ids", "history", "ratings", "nodes"):
        if column in frame.columns:
            n = frame.select(F.size(column).alias("n")).first()
            if n is None:
                raise ValueError(f"{table} is empty: cannot tell how many values a row's {column} holds")
            return column, (int(n["n"]),)
    raise ValueError(f"{table} has none of the columns pixels, features, ids, history, ratings, nodes (columns: {frame.columns})")


def rating_index(train: TableRef, column: str = "item") -> list[str]:
    """A recommender's item (or user) ids in rating-vector order: the <name>_items (_users) table
    that the prepare job that wrote `train` (<name>_vectors_train or _item_vectors_train) wrote with
    it; positions change when new items or users arrive."""
    uri = re.sub(r"_(item_)?vectors_train$", "", train.uri) + f"_{column}s"
    if lake.latest_version(uri) is None:
        raise InputNotFound(f"no {column} index at {uri}: run the prepare step first")
    job = next((c["metadata"].get("dlpipe.job_id") for c in lake.history(train.uri) if c["version"] == train.version), None)
    version = next((c["version"] for c in lake.history(uri) if job and c["metadata"].get("dlpipe.job_id") == job),
                   lake.latest_version(uri))
    index = lake.read_columns(uri, version, [column, "index"]).to_pandas().sort_values("index")
    return list(index[column])


def known_ratings(train: TableRef, items: list[str], users: int) -> np.ndarray:
    """users x items: every train rating of a <name>_item_vectors_train version (what the item-based
    AutoRec is served with), 0 where unrated; `items`: rating_index(train, "item")."""
    table = lake.read_columns(train.uri, train.version, ["item", "ratings"]).to_pandas()
    index = {item: i for i, item in enumerate(items)}
    known = np.zeros((len(items), users), np.float32)
    for item, vector in zip(table["item"], table["ratings"]):
        known[index[item]] = vector
    return known.T.copy()


def with_rating_range(model: ModelConfig, data: DataConfig) -> ModelConfig:
    """A recommender's hyperparameters with the rating scale of data.ratings (its levels, its clipping)."""
    import dataclasses

    params = dataclasses.replace(getattr(model, model.name), min_rating=data.ratings.min_rating,
                                 max_rating=data.ratings.max_rating)
    return dataclasses.replace(model, **{model.name: params})


def sequence_setup(spark: SparkSession, model: ModelConfig, tables: dict[str, TableRef], data: DataConfig) -> dict:
    """What a recurrent net on a text or time-series table (or an RNTN on a tree table) needs beyond
    its shape: for text and trees the vocabulary (<data.name>_vocab beside the train table, newest version: ids never change meaning)
    with the tokenizer settings the served model carries, and the classes (word2vec: the token
    counts too); for windows the horizon.
    Returns {"params", "num_outputs", "classes", "text" (or None)}."""
    import dataclasses

    from pipelines.text import TOKEN

    params = getattr(model, model.name)
    if data.kind == "timeseries":
        horizon = lake.read_table(spark, tables["val"].uri, tables["val"].version).select(F.size("target").alias("n")).first()
        return {"params": params, "num_outputs": int(horizon["n"]) if horizon else data.timeseries.horizon,
                "classes": [], "text": None}
    uri = tables["train"].uri.rsplit("_train", 1)[0] + "_vocab"
    if lake.latest_version(uri) is None:
        raise InputNotFound(f"no vocabulary table at {uri}: run the prepare step first")
    rows = lake.read_table(spark, uri, lake.latest_version(uri)).toPandas()
    tokens = rows[rows["kind"] == "token"].sort_values("id")
    vocab = list(tokens["token"])
    if list(tokens["id"]) != list(range(len(vocab))):
        raise ValueError(f"{uri}: token ids are not 0..{len(vocab) - 1}")
    classes = list(rows[rows["kind"] == "label"].sort_values("id")["token"])
    if model.task == "classification" and len(classes) < 2:
        raise ValueError(f"{uri} holds {len(classes)} classes: a classifier needs labelled text (data.text.label) or trees")
    params = dataclasses.replace(params, vocab_size=len(vocab))
    if model.task == "embedding":  # word2vec: subsampling and its noise words follow the corpus counts
        params = dataclasses.replace(params, counts=tuple(int(c) for c in tokens["count"]))
    text = ({"vocab": vocab, "lowercase": data.trees.lowercase, "format": "bracketed", "vocab_table": uri}
            if data.kind == "trees" else
            {"vocab": vocab, "unit": data.text.unit, "lowercase": data.text.lowercase, "pattern": TOKEN.pattern,
             "vocab_table": uri})
    outputs = len(classes) if model.task == "classification" else 1 if model.task == "embedding" else len(vocab)
    return {"params": params, "num_outputs": outputs, "classes": classes if model.task == "classification" else [],
            "text": text}


def net_for(model: ModelConfig, data_name: str, input_column: str, input_shape: tuple[int, ...], num_classes: int,
            sequence: dict | None = None) -> Net:
    """`sequence`: sequence_setup()'s answer for text and time-series tables."""
    spec = REGISTRY[model.name]
    kind = INPUT_KINDS[input_column]
    if kind not in spec.inputs:
        raise ValueError(f"model.name={model.name} takes {' or '.join(spec.inputs)} input; "
                         f"data.name={data_name} is a {kind} table")
    if sequence is not None:
        return Net(name=model.name, params=sequence["params"], input_shape=tuple(input_shape),
                   num_outputs=sequence["num_outputs"], task=model.task)
    return Net(name=model.name, params=getattr(model, model.name), input_shape=tuple(input_shape),
               num_outputs=num_classes if model.task == "classification" else 1, task=model.task)


def image_net(model: ModelConfig, data: DataConfig) -> Net:
    """The configured model for the configured image data (no table needed)."""
    shape = (data.channels, data.image_size, data.image_size)
    return net_for(model, data.name, "pixels", shape, len(label_view(data, model.task)[0]))


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
