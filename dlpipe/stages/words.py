"""`dlpipe words similar|analogy`: questions to a registered word2vec model, answered from its
pyfunc as a consumer would (dlpipe.words); and, for `dlpipe embed` on word vectors, the
<name>_embeddings table (word, vector, count) with the projection of the frequent words."""

from __future__ import annotations

import mlflow
from pyspark.sql import SparkSession

from dlpipe import lake, modeling, tracking, words
from dlpipe.config import MlflowConfig
from dlpipe.errors import ConfigError
from dlpipe.refs import TableRef


def run(mlflow_cfg: MlflowConfig, *, action: str, model_uri: str, word: str, terms: list[str], k: int) -> dict:
    if k <= 0:
        raise ConfigError(f"--k: expected a positive number of words, got {k}")
    if action == "similar" and (not word or terms):
        raise ConfigError("`dlpipe words similar` takes --word W (and no positional words)")
    if action == "analogy" and len(terms) != 3:
        raise ConfigError(f"`dlpipe words analogy` takes three words A B C (A is to B as C is to ?), got {len(terms)}")
    tracking.setup(mlflow_cfg)
    model_uri = modeling.resolve(model_uri)
    vectors = words.load(model_uri)
    if action == "similar":
        return {"step": "words", "action": "similar", "model_uri": model_uri, "word": word,
                "nearest": words.similar(vectors, word, k)}
    a, b, c = terms
    return {"step": "words", "action": "analogy", "model_uri": model_uri, "question": f"{a} : {b} :: {c} : ?",
            "nearest": words.analogy(vectors, a, b, c, k)}


def embed(spark: SparkSession, *, model_uri: str, out_uri: str, run_name: str) -> dict:
    """Every word's vector into `out_uri` (one Delta version), the projection logged to MLflow."""
    vectors = words.load(model_uri)
    frame = spark.createDataFrame(words.table_rows(vectors), "word string, vector array<float>, count long")
    version = lake.write_table(frame, out_uri, metadata={"dlpipe.step": "embed", "dlpipe.model_uri": model_uri})
    print(f"dlpipe: {len(vectors.words)} word vectors of {model_uri} into {TableRef(out_uri, version)}", flush=True)
    with mlflow.start_run(run_name=f"{run_name}-embed"):
        mlflow.set_tags({"dlpipe.step": "embed", "dlpipe.model_uri": model_uri})
        mlflow.log_params({"embeddings": str(TableRef(out_uri, version)), "words": len(vectors.words)})
        mlflow.log_figure(words.projection_figure(vectors.words, vectors.matrix), "plots/word_projection.png")
    return {"step": "embed", "model_uri": model_uri,
            "embeddings": {"uri": out_uri, "version": version, "rows": len(vectors.words)}}
