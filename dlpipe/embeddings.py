"""Image similarity (course notes 001): the activations of the layer before the classifier are an
embedding; images whose embeddings point the same way look alike. `embed` computes them on Spark
for a whole image table (the model loaded once per executor process) into `<name>_embeddings`,
clusters them with Spark MLlib's KMeans and reports cluster purity against the labels (beside the
purity of KMeans on the raw pixels); `similar` returns the nearest images by cosine similarity."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe import lake, modeling
from dlpipe.config import Config

SPLITS = ("train", "val", "test")
EMBEDDING_SCHEMA = "key string, source string, label int, label_name string, split string, embedding array<float>"
_LOADED: dict[str, tuple] = {}  # per executor process: shipped model directory -> (module, meta)


def _load(shipped: str):
    from pyspark import SparkFiles

    from dlpipe.tracking import net_from_dir

    path = SparkFiles.get(shipped)
    if path not in _LOADED:
        torch.set_num_threads(1)
        _LOADED[path] = net_from_dir(path)
    return _LOADED[path]


@torch.no_grad()
def embeddings(module: torch.nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """L2-normalised activations of `module.features` (so a dot product is a cosine similarity)."""
    out = [module.features(torch.from_numpy(np.ascontiguousarray(x[i : i + batch], np.float32))) for i in range(0, len(x), batch)]
    e = torch.cat(out).float() if out else torch.zeros(0, 1)
    return torch.nn.functional.normalize(e, dim=1).numpy()


def embed_table(spark: SparkSession, images: DataFrame, model_uri: str) -> DataFrame:
    """key, source, label, label_name, split, embedding for every row of an image DataFrame."""
    from dlpipe.scoring import model_meta, ship_model

    shipped = ship_model(spark, model_uri)
    shape = tuple(model_meta(shipped)["input_shape"])

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        module, _ = _load(shipped)
        for b in batches:
            x = np.stack(b["pixels"].to_numpy()).reshape(-1, *shape) if len(b) else np.zeros((0, *shape), np.float32)
            yield pd.DataFrame({"key": b["key"], "source": b["source"], "label": b["label"], "label_name": b["label_name"],
                                "split": b["split"], "embedding": list(embeddings(module, x))})

    return images.select("key", "source", "label", "label_name", "split", "pixels").mapInPandas(run, EMBEDDING_SCHEMA)


def purity(clustered: DataFrame, k: int) -> float:
    """Share of rows whose label is the most common label of their cluster."""
    counts = clustered.groupBy("cluster", "label").count()
    best = counts.groupBy("cluster").agg(F.max("count").alias("n")).agg(F.sum("n")).first()[0] or 0
    total = clustered.count()
    return float(best) / total if total else 0.0


def kmeans_purity(df: DataFrame, column: str, k: int, seed: int) -> tuple[float, DataFrame]:
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    vectors = df.select("key", "label", array_to_vector(column).alias("features")).cache()
    model = KMeans(k=k, seed=seed, featuresCol="features", predictionCol="cluster", maxIter=30).fit(vectors)
    clustered = model.transform(vectors).select("key", "label", "cluster").cache()
    try:
        return purity(clustered, k), clustered
    finally:
        vectors.unpersist()


def embed(spark: SparkSession, cfg: Config, model_uri: str = "") -> dict:
    """`dlpipe embed`: embeddings of the latest train/val/test tables -> <name>_embeddings, then
    KMeans (k = number of classes) on embeddings and on raw pixels, purity logged to MLflow."""
    import mlflow

    from dlpipe import tracking

    tracking.setup(cfg.mlflow)
    model_uri = modeling.resolve(model_uri or f"models:/{cfg.registry.model_name}@champion")
    parts, sources = [], []
    for split in SPLITS:
        uri = cfg.table_uri(split)
        version = lake.latest_version(uri)
        if version is None:
            raise FileNotFoundError(f"no Delta table at {uri}: run the prepare step first")
        parts.append(lake.read_table(spark, uri, version).withColumn("split", F.lit(split)))
        sources.append(f"{uri}@{version}")
    images = parts[0].unionByName(parts[1]).unionByName(parts[2])
    out_uri = cfg.table_uri("embeddings")
    print(f"dlpipe: embedding {', '.join(sources)} with {model_uri}", flush=True)
    version = lake.write_table(embed_table(spark, images, model_uri), out_uri,
                               metadata={"dlpipe.step": "embed", "dlpipe.model_uri": model_uri, "dlpipe.source": ",".join(sources)})
    table = lake.read_table(spark, out_uri, version)
    k = len(cfg.data.classes)
    embedding_purity, clustered = kmeans_purity(table, "embedding", k, cfg.train.seed)
    pixel_purity, _ = kmeans_purity(images, "pixels", k, cfg.train.seed)
    rows = clustered.count()
    print(f"dlpipe: KMeans k={k} on {rows} rows: cluster purity {embedding_purity:.3f} on embeddings, "
          f"{pixel_purity:.3f} on raw pixels", flush=True)
    with mlflow.start_run(run_name=f"{cfg.registry.model_name}-embed"):
        mlflow.set_tags({"dlpipe.step": "embed", "dlpipe.model_uri": model_uri})
        mlflow.log_params({"embeddings.uri": out_uri, "embeddings.version": version, "kmeans.k": k, "source": ",".join(sources)})
        mlflow.log_metrics({"cluster_purity": embedding_purity, "raw_pixel_cluster_purity": pixel_purity})
    return {"step": "embed", "model_uri": model_uri, "embeddings": {"uri": out_uri, "version": version, "rows": rows},
            "kmeans": {"k": k, "cluster_purity": embedding_purity, "raw_pixel_cluster_purity": pixel_purity}}


def similar(spark: SparkSession, cfg: Config, image_uri: str, k: int = 10) -> dict:
    """`dlpipe similar`: the k images of <name>_embeddings nearest to `image_uri` by cosine
    similarity, embedded with the model version that built the table."""
    from dlpipe import tracking
    from dlpipe.explain import load_image

    tracking.setup(cfg.mlflow)
    uri = cfg.table_uri("embeddings")
    version = lake.latest_version(uri)
    if version is None:
        raise FileNotFoundError(f"no Delta table at {uri}: run `dlpipe embed` first")
    model_uri = next(c["metadata"]["dlpipe.model_uri"] for c in lake.history(uri) if c["version"] == version)
    module, meta = tracking.load_net(model_uri)
    query = embeddings(module, load_image(image_uri, tuple(meta["input_shape"]))[None])[0]
    return {"step": "similar", "image": image_uri, "model_uri": model_uri, "embeddings": {"uri": uri, "version": version},
            "neighbours": nearest(spark, lake.read_table(spark, uri, version), query, k)}


def nearest(spark: SparkSession, table: DataFrame, query: np.ndarray, k: int) -> list[dict]:
    q = spark.sparkContext.broadcast(np.asarray(query, np.float32))

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for b in batches:
            e = np.stack(b["embedding"].to_numpy()) if len(b) else np.zeros((0, len(q.value)), np.float32)
            yield pd.DataFrame({"key": b["key"], "source": b["source"], "label_name": b["label_name"],
                                "split": b["split"], "similarity": (e @ q.value).astype(np.float64)})

    scored = table.mapInPandas(score, "key string, source string, label_name string, split string, similarity double")
    return [r.asDict() for r in scored.orderBy(F.desc("similarity"), "key").limit(k).collect()]
