"""Airflow DAG: nightly `retrain` then `score` through deploy/submit-yarn.sh (spark-submit to
YARN with the packed Python environment). Copy this file into the DAGs folder and set
DLPIPE_HOME (the dlpipe checkout on the Airflow worker, with dist/dlpipe-env.tar.gz built by
deploy/pack-env.sh) and DLPIPE_CONF.

Both tasks are idempotent: retrain does nothing without new data (and promotes at most once per
set of table versions); score writes the slice (champion version, logical date) in one Delta
commit, so a retried or re-run night replaces its own rows instead of adding more."""

import os
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

DLPIPE_HOME = os.environ.get("DLPIPE_HOME", "/opt/dlpipe")
DLPIPE_CONF = os.environ.get("DLPIPE_CONF", "conf/fashion_cnn.yaml")

# dlpipe arguments per task (tests/test_deploy.py parses them with dlpipe's own CLI and config)
COMMANDS = {
    "retrain": ["retrain", "--conf", "{conf}", "--summary", "/tmp/dlpipe-retrain-{{ ds }}.json"],
    "score": ["score", "--conf", "{conf}", "--set", "score.run_date={{ ds }}",
              "--summary", "/tmp/dlpipe-score-{{ ds }}.json"],
}


def bash_command(task: str) -> str:
    args = " ".join(COMMANDS[task]).replace("{conf}", f"{DLPIPE_HOME}/{DLPIPE_CONF}")
    return f"{DLPIPE_HOME}/deploy/submit-yarn.sh {args}"


with DAG(
    dag_id="dlpipe_nightly",
    description="dlpipe: retrain on new data (champion/challenger), then batch-score with the champion",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
    tags=["dlpipe"],
) as dag:
    retrain = BashOperator(task_id="retrain", bash_command=bash_command("retrain"),
                           execution_timeout=timedelta(hours=4))
    score = BashOperator(task_id="score", bash_command=bash_command("score"), execution_timeout=timedelta(hours=2))
    retrain >> score
