# Two commands on a fresh machine:  `make zoo`  (set up + train the tiny zoo)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ZOO    ?= zoo/tiny

.PHONY: setup zoo demo test bench clean

setup: $(VENV)/.installed

# torch first, pinned to the local CPU wheel: a bare `torch` requirement resolved by pip could pull
# a multi-GB CUDA build. Everything else then finds torch already satisfied.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

zoo: setup
	$(BIN)/workbench zoo --preset tiny --out $(ZOO)

demo: setup
	$(BIN)/workbench demo --zoo $(ZOO)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/bench_train_throughput.py --out benchmarks/last_train_throughput.json

clean:
	rm -rf $(VENV) zoo .pytest_cache
