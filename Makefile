# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_WHEEL ?= torch==2.13.0

$(BIN)/.xtok-installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the local CPU wheel (find-links); override with TORCH_WHEEL=...
	$(BIN)/python -m pip install -q $(TORCH_WHEEL)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.xtok-installed

demo: install
	$(BIN)/xtok demo

test: install
	$(BIN)/python -m pytest tests/ -q --durations=15

bench: install
	$(BIN)/python -m pytest benchmarks/ --benchmark -q -s

.PHONY: install demo test bench
