# ScarWatch: `make demo` and `make test` do all the set-up on a fresh machine (Python >= 3.11, git, make).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: all venv sysdeps demo test lint typecheck pytest bench clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ScarWatch needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# System packages (Debian/Ubuntu, as root): chromium for the browser test of the inspector map; fonts-noto-cjk
# for CJK text in charts and the PDF; Pango for WeasyPrint (the report's PDF); poppler-utils (pdftotext,
# pdftoppm) for the report tests.
SYSDEPS := chromium fonts-noto-cjk libpango-1.0-0 libpangoft2-1.0-0 poppler-utils
sysdeps:
	@if command -v chromium >/dev/null 2>&1 && command -v pdftotext >/dev/null 2>&1 \
		&& fc-list 2>/dev/null | grep -qi 'Noto Sans CJK' && ldconfig -p 2>/dev/null | grep -q libpangoft2; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(SYSDEPS) (apt)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS) >/dev/null) \
		|| echo "warning: apt-get failed; browser and PDF tests will be skipped"; \
	else echo "note: install $(SYSDEPS) for the browser test, CJK charts and the report's PDF"; fi

demo: venv
	dvc repro
	@echo
	@echo "Inspector maps : $$(ls reports/maps/*.html | tr '\n' ' ')"
	@echo "Monthly reports: $$(ls reports/monthly/*.html | tr '\n' ' ')"
	@echo "Scar ledger    : data/processed/ledger.gpkg (layers events, cases, alerts)"
	@echo "Dispatch lists (派单), per month one XLSX + CSV + GeoJSON per unit (index: dispatch.json):"
	@for d in reports/dispatch/*/; do f=$$(cd "$$d" && ls *.xlsx 2>/dev/null | tr '\n' ' '); echo "  $$d $${f:-(nothing dispatched)}"; done
	@echo "Demo flags against the demo truth, all months pooled:"
	@$(BIN)/scarwatch -q demo-accuracy

lint: venv
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

typecheck: venv
	$(BIN)/mypy

pytest: venv sysdeps
	$(BIN)/python -m pytest -q --durations=15

test: lint typecheck pytest

# BENCHMARKS.md + benchmarks/results.json (4 min on 2 idle cores, 8 beside a training run). The bench extra (torchgeo, the peer)
# is installed pinned to the torch already here, so pip never fetches another torch (the pins drop the local
# label, +cu130: pip refuses a constraint torch==X+cu130 against the package's own torch==X).
bench: venv
	@$(BIN)/python -c 'import torchgeo' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]' \
		-c <($(BIN)/python -c 'import torch, torchvision; print("torch==%s\ntorchvision==%s" % (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]))')
	nice -n 5 $(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf data/demo data/interim data/processed reports/maps reports/monthly reports/metrics reports/dispatch .pytest_cache .mypy_cache
