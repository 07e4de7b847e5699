"""Image embeddings (course notes 001): the activations of the layer before the classifier;
images whose embeddings point the same way look alike. Computed on Spark for a whole image table
(the model loaded once per executor process), clustered with MLlib's KMeans (cluster purity
against the labels), searched by cosine similarity. The stages are dlpipe.stages.embed and
dlpipe.stages.similar."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F


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


def nearest(spark: SparkSession, table: DataFrame, query: np.ndarray, k: int) -> list[dict]:
    q = spark.sparkContext.broadcast(np.asarray(query, np.float32))

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for b in batches:
            e = np.stack(b["embedding"].to_numpy()) if len(b) else np.zeros((0, len(q.value)), np.float32)
            yield pd.DataFrame({"key": b["key"], "source": b["source"], "label_name": b["label_name"],
                                "split": b["split"], "similarity": (e @ q.value).astype(np.float64)})

    scored = table.mapInPandas(score, "key string, source string, label_name string, split string, similarity double")
    return [r.asDict() for r in scored.orderBy(F.desc("similarity"), "key").limit(k).collect()]
