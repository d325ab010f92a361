# Two entry points (see README): `make train` runs the main job, `make test` runs everything CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

train: install
	$(BIN)/python examples/train_char_gpt.py

# pytest: a crashed worker (a segfault) fails the run at once rather than being replaced.
test: install
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0
	$(BIN)/python scripts/run_examples.py --smoke --skip-tested --jobs 2
	$(BIN)/python scripts/run_benchmarks.py --jobs 2
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet --site-dir .site

lint: install
	$(BIN)/python -m ruff check .

docs: install
	$(BIN)/python -m mkdocs serve

clean:
	rm -rf $(VENV) .site
