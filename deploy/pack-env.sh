#!/usr/bin/env bash
# Pack the Python environment that YARN executors unpack (Spark's "Python Package Management":
# venv-pack + --archives). Builds a fresh venv with the same installs as `make setup`, installs
# dlpipe into it (not editable) with conf/ beside the package (the experiment files), and
# writes dist/dlpipe-env.tar.gz.
#
#   deploy/pack-env.sh [OUT]        # OUT defaults to dist/dlpipe-env.tar.gz
#
# Build it on the same OS and CPU architecture as the cluster nodes (or in deploy/Dockerfile).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/dist/dlpipe-env.tar.gz}"
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT

python3 -m venv "$BUILD/env"
PY="$BUILD/env/bin/python"
"$PY" -m pip install --upgrade pip venv-pack
"$PY" -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$PY" -m pip install "$ROOT[datasets]"
bash "$ROOT/deploy/install_horovod.sh" "$BUILD/env"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp -r "$ROOT/conf" "$SITE/conf"   # the experiment files (--conf conf/<name>.yaml)
mkdir -p "$(dirname "$OUT")"
"$BUILD/env/bin/venv-pack" -p "$BUILD/env" -o "$OUT" --force
echo "pack-env: wrote $OUT"
