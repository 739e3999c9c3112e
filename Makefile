# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench-quick

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

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/table5_grid.py --quick

clean:
	rm -rf $(VENV) runs
