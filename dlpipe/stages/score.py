"""`dlpipe score`: batch predictions of one registered model version (the alias resolved once) on
one table version: score.input, by default the test table the model's lineage names (else the
latest <name>_test). Rows the model cannot take are kept with their reason. One commit replaces
the (model version, run date) slice of <name>_predictions, so a rerun never duplicates rows."""

from __future__ import annotations

import datetime

from mlflow.tracking import MlflowClient
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dlpipe import lake, registry, tracking
from dlpipe.config import MlflowConfig, ScoreConfig
from dlpipe.errors import InputNotFound
from dlpipe.refs import TableRef, resolve
from dlpipe.scoring import predict


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def model_version(client: MlflowClient, model_uri: str):
    """models:/<name>@<alias> or models:/<name>/<version> -> the registered version it means now."""
    name, sep, alias = model_uri.removeprefix("models:/").partition("@")
    try:
        if sep:
            return client.get_model_version_by_alias(name, alias)
        name, _, version = name.rstrip("/").rpartition("/")
        return client.get_model_version(name, version)
    except Exception:
        raise InputNotFound(f"{model_uri} does not resolve to a registered model version") from None


def input_table(spec: str, lineage: TableRef | None, default_uri: str) -> tuple[TableRef, str]:
    """(the table to score, where that choice came from)."""
    if spec:
        return resolve(spec, key="score.input"), "score.input"
    if lineage is not None:
        return resolve(str(lineage), key="the model's dlpipe.table.test tag"), "the model's lineage"
    return resolve("", default_uri), "the latest version (the model names no test table)"


def run(spark: SparkSession, score: ScoreConfig, mlflow_cfg: MlflowConfig, *, model_name: str, default_input: str,
        out_uri: str) -> dict:
    """`default_input`: the table scored when neither score.input nor the model's lineage names one."""
    tracking.setup(mlflow_cfg)
    client = MlflowClient()
    version = model_version(client, score.model_uri or f"models:/{model_name}@champion")
    name, number = version.name, int(version.version)
    model_uri = f"models:/{name}/{number}"
    table, why = input_table(score.input, registry.tables_of(version).get("test"), default_input)
    say(f"scoring {table} ({why}) with {model_uri}")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(score.batch_size))
    run_date = (datetime.date.fromisoformat(score.run_date) if score.run_date
                else datetime.datetime.now(datetime.UTC).date())
    predictions = predict(spark, lake.read_table(spark, table.uri, table.version, stored=True), model_uri)
    outputs = [c for c in predictions.columns if c not in ("key", "label", "rejected_reason")]
    predictions = predictions.select(  # what the model gives: a prediction (and classes), a code, a map unit
        "key", *outputs, "rejected_reason",
        F.lit(name).alias("model_name"), F.lit(number).alias("model_version"),
        F.lit(run_date).alias("run_date"), F.current_timestamp().alias("scored_at"),
    )
    out_version = lake.replace_where(predictions, out_uri, {"model_version": number, "run_date": run_date}, metadata={
        "dlpipe.step": "score", "dlpipe.model_uri": model_uri, "dlpipe.source": str(table),
        "dlpipe.run_date": run_date.isoformat()})

    def in_slice(v: int):
        rows = lake.read_table(spark, out_uri, v)
        return rows.where((F.col("model_version") == number) & (F.col("run_date") == F.lit(run_date)))

    written = in_slice(out_version)
    rows, rejected = written.count(), written.where(F.col("rejected_reason").isNotNull()).count()
    replaced = in_slice(out_version - 1).count() if out_version > 0 else 0
    say(f"scored {table} with {model_uri} into {out_uri} version {out_version} (run date {run_date}; "
        f"{rejected} rows rejected, kept with their reason; {replaced} earlier rows of this model version and date replaced)")
    return {"step": "score", "model_uri": model_uri, "model_name": name, "model_version": number,
            "run_date": run_date.isoformat(), "input": table.to_dict(), "input_chosen_by": why,
            "predictions": {"uri": out_uri, "version": out_version, "rows_appended": rows, "rows_rejected": rejected,
                            "rows_replaced": replaced}}
