"""`dlpipe embed`: embeddings of the image tables (train.tables, default the newest set one prepare
job wrote) into <name>_embeddings, then KMeans (k = number of classes) on the embeddings and on the
raw pixels; cluster purity logged to MLflow. A word2vec model's words instead (dlpipe.stages.words):
word, vector, count."""

from __future__ import annotations

import mlflow
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dlpipe import lake, modeling, tracking
from dlpipe.config import DataConfig, MlflowConfig
from dlpipe.embeddings import embed_table, kmeans_purity
from dlpipe.refs import SPLITS, TableRef


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def run(spark: SparkSession, data: DataConfig, mlflow_cfg: MlflowConfig, *, model_uri: str,
        tables: dict[str, TableRef], out_uri: str, seed: int, run_name: str) -> dict:
    tracking.setup(mlflow_cfg)
    model_uri = modeling.resolve(model_uri)
    if tracking.logged_meta(model_uri).get("task") == "embedding":  # word vectors: one row per word
        from dlpipe.stages import words

        return words.embed(spark, model_uri=model_uri, out_uri=out_uri, run_name=run_name)
    parts = [lake.read_table(spark, tables[s].uri, tables[s].version).withColumn("split", F.lit(s)) for s in SPLITS]
    images = parts[0].unionByName(parts[1]).unionByName(parts[2])
    sources = ",".join(str(tables[s]) for s in SPLITS)
    say(f"embedding {sources} with {model_uri}")
    version = lake.write_table(embed_table(spark, images, model_uri), out_uri,
                               metadata={"dlpipe.step": "embed", "dlpipe.model_uri": model_uri, "dlpipe.source": sources})
    table = lake.read_table(spark, out_uri, version)
    k = len(data.classes)
    embedding_purity, clustered = kmeans_purity(table, "embedding", k, seed)
    pixel_purity, _ = kmeans_purity(images, "pixels", k, seed)
    rows = clustered.count()
    say(f"KMeans k={k} on {rows} rows: cluster purity {embedding_purity:.3f} on embeddings, "
        f"{pixel_purity:.3f} on raw pixels")
    with mlflow.start_run(run_name=f"{run_name}-embed"):
        mlflow.set_tags({"dlpipe.step": "embed", "dlpipe.model_uri": model_uri})
        mlflow.log_params({"embeddings": str(TableRef(out_uri, version)), "kmeans.k": k, "source": sources})
        mlflow.log_metrics({"cluster_purity": embedding_purity, "raw_pixel_cluster_purity": pixel_purity})
    return {"step": "embed", "model_uri": model_uri, "tables": {s: tables[s].to_dict() for s in SPLITS},
            "embeddings": {"uri": out_uri, "version": version, "rows": rows},
            "kmeans": {"k": k, "cluster_purity": embedding_purity, "raw_pixel_cluster_purity": pixel_purity}}
