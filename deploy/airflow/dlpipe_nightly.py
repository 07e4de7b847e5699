"""Airflow DAG: nightly `retrain` then `score` through deploy/submit-yarn.sh (spark-submit to
YARN with the packed Python environment). Copy this file into the DAGs folder and set
DLPIPE_HOME (the dlpipe checkout on the Airflow worker, with dist/dlpipe-env.tar.gz built by
deploy/pack-env.sh) and DLPIPE_CONF.

The tasks hand off by reference: retrain prints its summary as one JSON line last
(--summary-line), Airflow pushes that line to XCom, and score takes it with --upstream, so it
scores with exactly the model version retrain left as champion (models:/<name>/<version>), on the
test table that version's lineage names. The drivers run in client mode, on the Airflow worker,
so that their last stdout line reaches Airflow.

Both tasks are idempotent: retrain does nothing without new data (and promotes at most once per
set of table versions); score writes the slice (champion version, logical date) in one Delta
commit, so a retried or re-run night replaces its own rows instead of adding more."""

import os
import shlex
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

DLPIPE_HOME = os.environ.get("DLPIPE_HOME", "/opt/dlpipe")
DLPIPE_CONF = os.environ.get("DLPIPE_CONF", "conf/fashion_cnn.yaml")

# dlpipe arguments per task (tests/test_deploy.py parses them with dlpipe's own CLI and config)
COMMANDS = {
    "retrain": ["retrain", "--conf", "{conf}", "--summary-line"],
    "score": ["score", "--conf", "{conf}", "--set", "score.run_date={{ ds }}",
              "--upstream", '{{ ti.xcom_pull(task_ids="retrain") }}', "--summary-line"],
}
CLIENT_MODE = {"DLPIPE_DEPLOY_MODE": "client"}  # the driver's stdout (the summary line) is this task's


def bash_command(task: str) -> str:
    args = " ".join(shlex.quote(a.replace("{conf}", f"{DLPIPE_HOME}/{DLPIPE_CONF}")) for a in COMMANDS[task])
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
    retrain = BashOperator(task_id="retrain", bash_command=bash_command("retrain"), env=CLIENT_MODE, append_env=True,
                           do_xcom_push=True, execution_timeout=timedelta(hours=4))
    score = BashOperator(task_id="score", bash_command=bash_command("score"), env=CLIENT_MODE, append_env=True,
                         do_xcom_push=True, execution_timeout=timedelta(hours=2))
    retrain >> score
