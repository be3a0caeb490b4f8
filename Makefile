# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
EXTRAS := vision,speech,speech-world,speech-mos,tracking,dev

.PHONY: setup demo demo-text test test-all lint zoo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: setup  ## build the offline digits image world (first time only) and align it with DDPO (60 of the recipe's 160 steps)
	$(BIN)/mmalign train vision/ddpo_digits.yaml --output-dir runs/demo-ddpo --set train.max_steps=60
	@echo "before/after grids: runs/demo-ddpo/samples_before.png runs/demo-ddpo/samples_after.png"
	@echo "report: runs/demo-ddpo/report.md   summary: runs/demo-ddpo/summary.json"

demo-text: setup  ## build the offline text world (first time only) and align it with DPO
	$(BIN)/mmalign train text/dpo.yaml --output-dir runs/demo-dpo
	@echo "report: runs/demo-dpo/report.md   summary: runs/demo-dpo/summary.json"

test: setup  ## every test, the method × model matrix and the few slow end-to-end ones, on 2 workers (what CI runs)
	$(BIN)/python -m pytest -q -n 2

lint: setup  ## style, layering (import-linter) and static types (mypy on core, objectives, train)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports && $(BIN)/mypy

zoo: setup
	$(BIN)/mmalign zoo build text

BENCH := benchmarks/.venv-trl
bench:  ## DPO and GRPO side by side with trl, in their own venv (trl is not a runtime dependency)
	test -x $(BENCH)/bin/python || $(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
	$(BENCH)/bin/python -m pip install -q -c constraints.txt -e .
	$(BENCH)/bin/python -m pip install -q -c constraints.txt -r benchmarks/requirements-trl.txt
	$(BENCH)/bin/python benchmarks/dpo_vs_trl.py
	$(BENCH)/bin/python benchmarks/grpo_vs_trl.py

clean:
	rm -rf $(VENV) runs
