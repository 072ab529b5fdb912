# Potluck: `make demo` and `make test` work on a fresh machine (they build .venv first).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off --upgrade pip
	$(BIN)/pip install --quiet --progress-bar off -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/potluck finetune --data examples/support_emails/train.csv --text-column body \
		--label-column urgency --out models/demo-urgency --epochs 3
	$(BIN)/potluck evaluate models/demo-urgency --data examples/support_emails/test.csv \
		--text-column body --label-column urgency
	$(BIN)/potluck predict models/demo-urgency --input examples/support_emails/new.txt
	$(BIN)/potluck predict models/demo-urgency "The server is down and customers cannot pay"

test: $(STAMP)
	bash scripts/system-deps.sh
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) models build src/*.egg-info
