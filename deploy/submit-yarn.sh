#!/usr/bin/env bash
# spark-submit a dlpipe job to YARN, shipping the packed Python environment with --archives
# (Spark's documented venv-pack route: executors and the driver run ./environment/bin/python).
#
#   deploy/submit-yarn.sh JOB [dlpipe options]
#   deploy/submit-yarn.sh retrain --conf conf/fashion_cnn.yaml --summary retrain.json
#
# JOB: prepare | train | evaluate | retrain | score (jobs/JOB.py). The --conf file is shipped with
# --files and read from the driver's working directory. Environment:
#   DLPIPE_ENV_ARCHIVE   packed env (default dist/dlpipe-env.tar.gz, built by deploy/pack-env.sh)
#   DLPIPE_DEPLOY_MODE   cluster (default) | client
#   DLPIPE_EXECUTORS     number of executors (default 2; train.num_workers needs that many task slots)
#   SPARK_SUBMIT_OPTS_EXTRA  more spark-submit options, e.g. "--queue ml --executor-memory 8g"
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
JOB="${1:-}"
case "$JOB" in
    prepare|train|evaluate|retrain|score) shift ;;
    *) echo "usage: $0 {prepare|train|evaluate|retrain|score} [--conf FILE] [--set KEY=VALUE ...] [--summary FILE]" >&2; exit 2 ;;
esac
ARCHIVE="${DLPIPE_ENV_ARCHIVE:-$ROOT/dist/dlpipe-env.tar.gz}"
[ -f "$ARCHIVE" ] || { echo "$0: no packed environment at $ARCHIVE: run deploy/pack-env.sh first" >&2; exit 2; }

FILES=() ARGS=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--conf" ] && [ $# -ge 2 ]; then
        FILES+=("$2"); ARGS+=("--conf" "$(basename "$2")"); shift 2
    else
        ARGS+=("$1"); shift
    fi
done

# delta-spark and hadoop-aws (make setup fetched them); without them the jobs write Delta with delta-rs
JARS="$(ls "$ROOT"/.work/jars/*.jar 2>/dev/null | paste -sd, - || true)"

# shellcheck disable=SC2086
exec spark-submit \
    --master yarn \
    --deploy-mode "${DLPIPE_DEPLOY_MODE:-cluster}" \
    --name "dlpipe-$JOB" \
    --num-executors "${DLPIPE_EXECUTORS:-2}" \
    --archives "$ARCHIVE#environment" \
    --conf spark.pyspark.python=./environment/bin/python \
    --conf spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python \
    --conf spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python \
    ${FILES[@]+--files "$(IFS=,; echo "${FILES[*]}")"} \
    ${JARS:+--jars "$JARS"} \
    ${SPARK_SUBMIT_OPTS_EXTRA:-} \
    "$ROOT/jobs/$JOB.py" ${ARGS[@]+"${ARGS[@]}"}
