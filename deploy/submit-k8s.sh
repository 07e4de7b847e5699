#!/usr/bin/env bash
# spark-submit a dlpipe job to Kubernetes in cluster mode. The Python environment is the
# container image (deploy/Dockerfile or Dockerfile.gpu): driver and executors run /opt/venv, with the
# image's delta-spark and hadoop-aws jars (/opt/dlpipe/.work/jars) on their classpath.
#
#   deploy/submit-k8s.sh JOB [dlpipe options]
#   DLPIPE_IMAGE=registry.example.com/dlpipe:cpu deploy/submit-k8s.sh retrain --conf conf/fashion_cnn.yaml
#
# JOB: prepare | train | evaluate | retrain | score. --conf paths are inside the image, relative
# to /opt/dlpipe. Environment:
#   DLPIPE_IMAGE        container image (required)
#   K8S_API             API server (default https://kubernetes.default.svc: in-cluster, e.g. from the CronJob)
#   K8S_NAMESPACE       namespace (default dlpipe); K8S_SERVICE_ACCOUNT (default dlpipe-spark)
#   DLPIPE_EXECUTORS    executor pods (default 2)
#   SPARK_SUBMIT_OPTS_EXTRA  more options, e.g. "--conf spark.executor.resource.gpu.amount=1"
set -euo pipefail
JOB="${1:-}"
case "$JOB" in
    prepare|train|evaluate|retrain|score) shift ;;
    *) echo "usage: $0 {prepare|train|evaluate|retrain|score} [--conf FILE] [--set KEY=VALUE ...] [--summary FILE]" >&2; exit 2 ;;
esac
: "${DLPIPE_IMAGE:?set DLPIPE_IMAGE to the dlpipe container image}"

ARGS=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--conf" ] && [ $# -ge 2 ]; then
        case "$2" in /*) ARGS+=("--conf" "$2") ;; *) ARGS+=("--conf" "/opt/dlpipe/$2") ;; esac; shift 2
    else
        ARGS+=("$1"); shift
    fi
done

# shellcheck disable=SC2086
exec spark-submit \
    --master "k8s://${K8S_API:-https://kubernetes.default.svc}" \
    --deploy-mode cluster \
    --name "dlpipe-$JOB" \
    --conf spark.executor.instances="${DLPIPE_EXECUTORS:-2}" \
    --conf spark.kubernetes.container.image="$DLPIPE_IMAGE" \
    --conf spark.kubernetes.namespace="${K8S_NAMESPACE:-dlpipe}" \
    --conf spark.kubernetes.authenticate.driver.serviceAccountName="${K8S_SERVICE_ACCOUNT:-dlpipe-spark}" \
    --conf spark.pyspark.python=/opt/venv/bin/python \
    --conf spark.pyspark.driver.python=/opt/venv/bin/python \
    --conf "spark.driver.extraClassPath=/opt/dlpipe/.work/jars/*" \
    --conf "spark.executor.extraClassPath=/opt/dlpipe/.work/jars/*" \
    ${SPARK_SUBMIT_OPTS_EXTRA:-} \
    "local:///opt/dlpipe/jobs/$JOB.py" ${ARGS[@]+"${ARGS[@]}"}
