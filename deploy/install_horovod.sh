#!/usr/bin/env bash
# Install Horovod 0.28.1 (PyTorch + Gloo; no MPI, TensorFlow or MXNet) into a virtualenv.
#
#   deploy/install_horovod.sh [VENV]        # VENV defaults to .venv
#
# Idempotent: exits 0 at once if `import horovod.torch` already works in VENV.
#
# Horovod 0.28.1 (its last release) ships only an sdist; it is built here against the
# torch already installed in VENV (hence --no-build-isolation). Its CMake hard-codes
# C++14, but torch >= 2.1 headers need C++17, so the build runs with a g++/c++ wrapper
# first on PATH that rewrites -std=c++14 / -std=gnu++14 to the C++17 equivalents.
#
# Horovod's runtime deps (cloudpickle, psutil, pyyaml, packaging) come from the
# project's own requirements, so it is installed with --no-deps. Never install
# `horovod[spark]`: that extra pins pyarrow<11.
#
# pip's wheel cache is left on: the first run builds (~10 min on 2 cores), later runs
# into fresh venvs on the same machine reuse the cached wheel (seconds). The cache is
# keyed on the sdist, not on the torch version: if torch is changed, run
# `pip cache remove horovod` first (this script does so itself if the installed
# wheel fails to import).
set -euo pipefail

HOROVOD_VERSION=0.28.1
VENV="${1:-.venv}"
PY="$VENV/bin/python"

log() { echo "install_horovod: $*"; }
die() { echo "install_horovod: ERROR: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no Python interpreter at $PY (create the virtualenv first)"

if "$PY" -c "import horovod.torch" >/dev/null 2>&1; then
    v="$("$PY" -c 'import horovod; print(horovod.__version__)' 2>/dev/null || echo '?')"
    log "Horovod $v already installed in $VENV (import horovod.torch works); nothing to do."
    exit 0
fi

"$PY" -c "import torch" >/dev/null 2>&1 \
    || die "torch is not importable in $VENV; install torch first (Horovod is built against it)"

# Horovod is installed with --no-deps: its runtime deps must already be in the venv.
missing_py="$("$PY" - <<'EOF'
import importlib.util
mods = {"cloudpickle": "cloudpickle", "psutil": "psutil", "yaml": "pyyaml", "packaging": "packaging"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)"
[ -z "$missing_py" ] \
    || die "Horovod's runtime dependencies are missing from $VENV: $missing_py (pip install them first)"

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
    die "missing build tool(s): ${missing[*]} (Debian/Ubuntu: apt-get install -y cmake g++)"
fi
REAL_CXX="$(command -v g++)"

WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/install_horovod.XXXXXX")"
trap 'rm -rf "$WORKDIR"' EXIT

# Compiler wrapper: force C++17 (Horovod's CMake sets CMAKE_CXX_STANDARD 14).
cat >"$WORKDIR/g++" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    case "\$a" in
        -std=c++14) args+=("-std=c++17") ;;
        -std=gnu++14) args+=("-std=gnu++17") ;;
        *) args+=("\$a") ;;
    esac
done
exec "$REAL_CXX" "\${args[@]}"
EOF
chmod +x "$WORKDIR/g++"
ln -s "$WORKDIR/g++" "$WORKDIR/c++"

export PATH="$WORKDIR:$PATH"
export CXX="$WORKDIR/g++"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
# Horovod's setup.py runs make -j8 unless MAKEFLAGS is set; match the CPU count instead.
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc 2>/dev/null || echo 2)}"

pip_install() {
    "$PY" -m pip install --no-deps --no-build-isolation "$@" "horovod==$HOROVOD_VERSION"
}

torch_v="$("$PY" -c 'import torch; print(torch.__version__)')"
log "building Horovod $HOROVOD_VERSION from source against torch $torch_v, ~10 min on 2 cores" \
    "(a cached wheel from an earlier build is used if pip has one)"
start=$SECONDS
if ! pip_install; then
    die "pip failed to build/install horovod==$HOROVOD_VERSION (see the compiler output above)"
fi

if ! err="$("$PY" -c "import horovod.torch" 2>&1)"; then
    # A wheel from pip's cache that was built against another torch fails to load its
    # extension (mpi_lib_v2 ... undefined symbol); rebuild it. Anything else is fatal.
    if ! grep -qE "mpi_lib|undefined symbol" <<<"$err"; then
        echo "$err" >&2
        die "horovod==$HOROVOD_VERSION installed but 'import horovod.torch' fails (error above)"
    fi
    log "installed Horovod's extension does not load (cached wheel built against another torch?);" \
        "dropping it from pip's cache and rebuilding"
    "$PY" -m pip cache remove horovod >/dev/null 2>&1 || true
    pip_install --force-reinstall \
        || die "pip failed to rebuild horovod==$HOROVOD_VERSION (see the compiler output above)"
    "$PY" -c "import horovod.torch" \
        || die "horovod==$HOROVOD_VERSION rebuilt but 'import horovod.torch' still fails (error above)"
fi

"$PY" -c "import horovod.torch as hvd; assert hvd.gloo_built(), 'Horovod built without Gloo'" \
    || die "Horovod installed but was built without Gloo support"
# PyPI's torch is the CUDA build, but without a CUDA toolkit (CUDA_HOME / nvcc) Horovod's CMake builds
# no GPU operations: a CPU build whose allreduce runs over Gloo. Say which one this is.
ops="$("$PY" -c 'import horovod.torch as h; print("GPU (CUDA) operations" if h.cuda_built() else "CPU only, Gloo")')"
log "this Horovod build: $ops"
log "Horovod $HOROVOD_VERSION installed in $VENV in $((SECONDS - start)) s (PyTorch + Gloo)."
