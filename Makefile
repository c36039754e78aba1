# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-pythons lint typecheck pytest bench bench-scale soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/hpo_early_stop.py
	$(BIN)/python examples/hpo_optuna.py
	@echo "next: $(BIN)/flowsdk runs, then $(BIN)/flowsdk show NAME (the tree, with each action's values)" \
		"and $(BIN)/flowsdk show NAME ACTION (one action in full, e.g. a trial: its curve and logs), $(BIN)/flowsdk logs NAME;" \
		"the web console (curves of the search): $(BIN)/flowsdk ui"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy flowsdk tests examples benchmarks soak

# The suite on PYTEST_WORKERS pytest-xdist workers: 2, not `-n auto`, because that is the core
# count of the machines it runs on (a developer's and CI's, 2 cores), and each test starts
# subprocesses of its own (runners, the CLI, Ray, Chromium, PostgreSQL) that more workers than
# cores would only crowd. `--dist loadgroup` keeps each `xdist_group` on one worker
# (tests/conftest.py says which), so the Ray cluster, the browser and each shared console start
# once. `make test PYTEST_WORKERS=4` on a bigger machine.
PYTEST_WORKERS ?= 2

pytest: $(STAMP)
	bash scripts/ensure-postgres.sh
	sh scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

test: lint typecheck pytest

# The suite again on each newer Python installed (3.12, 3.13 by default; PYTHONS="3.13"
# for one), in its own .venv-X.Y. Not part of `make test`, which CI runs on 3.11.
test-pythons:
	bash scripts/ensure-postgres.sh
	sh scripts/ensure-chromium.sh
	sh scripts/test-pythons.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_abort.py
	$(BIN)/python benchmarks/bench_console.py
	$(BIN)/python benchmarks/bench_ray.py
	$(BIN)/python benchmarks/bench_report.py
	$(BIN)/python benchmarks/bench_instructions.py

# One run of 1,000,000 actions in waves of 10,000 (minutes): time and memory per wave.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py

# Long campaigns, not part of `make test`: SIGKILL runners at random moments; twenty runners
# fanning out on one SQLite file and aborts racing completion (soak/races.py).
soak: $(STAMP)
	$(BIN)/python soak/crash_campaign.py 120
	$(BIN)/python soak/races.py
	FLOWSDK_PROPERTY_EXAMPLES=10000 $(BIN)/python -m pytest -q -p no:randomly -o timeout=0 -o faulthandler_timeout=0 \
		tests/test_properties.py
	FLOWSDK_PROPERTY_EXAMPLES=3000 FLOWSDK_PROPERTY_STORE=sqlite $(BIN)/python -m pytest -q -p no:randomly \
		-o timeout=0 -o faulthandler_timeout=0 tests/test_properties.py

clean:
	rm -rf $(VENV) .venv-3.* .mypy_cache .ruff_cache build *.egg-info
