"""`dlpipe similar`: the k images of <name>_embeddings (latest version, said in the summary)
nearest to one image by cosine similarity, embedded with the model version that built the table."""

from __future__ import annotations

from pyspark.sql import SparkSession

from dlpipe import lake, tracking
from dlpipe.config import MlflowConfig
from dlpipe.embeddings import embeddings, nearest
from dlpipe.occlusion import load_image
from dlpipe.refs import resolve


def run(spark: SparkSession, mlflow_cfg: MlflowConfig, *, embeddings_uri: str, image_uri: str, k: int = 10) -> dict:
    tracking.setup(mlflow_cfg)
    table = resolve("", embeddings_uri, hint="run `dlpipe embed` first")
    model_uri = next(c["metadata"]["dlpipe.model_uri"] for c in lake.history(table.uri) if c["version"] == table.version)
    module, meta = tracking.load_net(model_uri)
    query = embeddings(module, load_image(image_uri, tuple(meta["input_shape"]))[None])[0]
    return {"step": "similar", "image": image_uri, "model_uri": model_uri, "embeddings": table.to_dict(),
            "neighbours": nearest(spark, lake.read_table(spark, table.uri, table.version), query, k)}
