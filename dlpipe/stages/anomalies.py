"""`dlpipe anomalies`: the rows of one table version a model trained without a target fits worst:
an autoencoder's largest reconstruction errors (a self-organizing map's largest quantization
errors), scored on Spark with the model's pyfunc (dlpipe.scoring)."""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dlpipe import lake, modeling, tracking
from dlpipe.config import MlflowConfig
from dlpipe.errors import DlpipeError
from dlpipe.refs import resolve
from dlpipe.scoring import ERROR_COLUMN, predict, scored_rows


def run(spark: SparkSession, mlflow_cfg: MlflowConfig, *, model_uri: str, table: str, top: int) -> dict:
    """The `top` rows of `table` (uri or uri@version; latest resolved once) by the model's error,
    largest first, with the mean error over every scored row."""
    tracking.setup(mlflow_cfg)
    model_uri = modeling.resolve(model_uri)
    ref = resolve(table, hint="give --table <uri> or <uri>@<version> of an image or features table")
    predictions = predict(spark, lake.read_table(spark, ref.uri, ref.version, stored=True), model_uri)
    error = next((c for c in ERROR_COLUMN.values() if c in predictions.columns), None)
    if error is None:
        raise DlpipeError(f"{model_uri} is a supervised model: anomalies ranks rows by the reconstruction error of "
                          "an autoencoder or the quantization error of a self-organizing map")
    scored = scored_rows(predictions).select("key", "label", error).cache()
    try:
        stats = scored.agg(F.count("*").alias("rows"), F.avg(error).alias("mean")).first()
        worst = scored.orderBy(F.desc(error), "key").limit(top).collect()
    finally:
        scored.unpersist()
    print(f"dlpipe: {stats['rows']} rows of {ref} scored with {model_uri}: mean {error} {stats['mean'] or 0:.5f}; "
          f"the {len(worst)} largest follow", flush=True)
    return {"step": "anomalies", "model_uri": model_uri, "table": ref.to_dict(), "error": error,
            "rows": int(stats["rows"]), "mean_error": float(stats["mean"] or 0.0),
            "top": [{"key": r["key"], "label": r["label"], error: r[error]} for r in worst]}
