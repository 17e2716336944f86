# Two commands for a fresh machine: `make demo` and `make test`. Both create/use ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

FLOOR_SITE := .venv-floor-site
FLOOR_STAMP := $(FLOOR_SITE)/.installed

.PHONY: install floor test quality style demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The oldest transformers the exported model files run on (configuration_spannorm.MIN_TRANSFORMERS_VERSION), for
# tests/test_remote_code.py::test_floor_version: only what differs from .venv (transformers, the huggingface_hub < 2 it
# requires, that hub's HTTP client), put ahead of .venv's site-packages through PYTHONPATH. About 130 MB, 30-70 s.
$(FLOOR_STAMP): Makefile | $(STAMP)
	rm -rf $(FLOOR_SITE)
	$(BIN)/pip install -q --no-deps --target $(FLOOR_SITE) \
		transformers==5.17.0 huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9
	touch $(FLOOR_STAMP)

floor: $(FLOOR_STAMP)

quality: $(STAMP)  # what CI checks: lint and formatting
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

style: $(STAMP)  # fix what `quality` reports, where ruff can
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) quality floor
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest tests -q

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python scripts/train.py --config configuration/spannorm-small.json --output runs/demo \
		--overwrite --seq-len 128 --batch-size 8 --max-steps 120 --warmup-steps 10 \
		--eval-every 40 --diag-every 40 --save-every 120 --log-every 10
	$(BIN)/python scripts/demo.py runs/demo

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) $(FLOOR_SITE) runs .pytest_cache .ruff_cache
