# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP) .dvc/plots_page.html

# torch/torchvision are asked for exactly: these builds lie on local disk; a looser spec downloads GBs.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev,pretrained,s3]"
	touch $(STAMP)

# The page `dvc plots show` fills (.dvc/config: plots.html_template), with Vega, Vega-Lite and vega-embed
# inlined from the vl-convert-python package: the plots draw offline, nothing is fetched when shown.
.dvc/plots_page.html: $(STAMP) pipeline/plots_page.py
	$(BIN)/python -m pipeline.plots_page

# The whole DAG on the embedded default data: data stages, sweeps, final models, evaluation, report.
demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/capline repro

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check pipeline stages tests

bench: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench

clean:
	rm -rf $(VENV) data artifacts metrics
