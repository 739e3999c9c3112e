# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench-quick coverage mutants

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[lite,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fixres fix

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Line coverage per module, the CLI subprocesses and torchrun workers included (pyproject [tool.coverage]).
coverage: $(STAMP)
	rm -rf .coverage-data && mkdir -p .coverage-data
	$(BIN)/coverage run -m pytest -q; rc=$$?; $(BIN)/coverage combine -q && $(BIN)/coverage report -i; exit $$rc

# Plants one-line bugs one at a time and checks that the suite notices each.
mutants: $(STAMP)
	$(BIN)/python tools/mutation_check.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/table5_grid.py --quick

clean:
	rm -rf $(VENV) runs .coverage-data
