# Two commands for a fresh machine: `make demo` and `make test`. Both create/use ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test quality style demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quality: $(STAMP)  # what CI checks: lint and formatting
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

style: $(STAMP)  # fix what `quality` reports, where ruff can
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) quality
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest tests -q

demo: $(STAMP)
	rm -rf runs/demo
	OMP_NUM_THREADS=2 $(BIN)/python scripts/train.py --config configuration/spannorm-small.json --output runs/demo \
		--seq-len 128 --batch-size 8 --max-steps 120 --lr 3e-3 --warmup-steps 10 \
		--eval-every 40 --diag-every 40 --save-every 120 --log-every 10
	$(BIN)/python scripts/demo.py runs/demo

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
