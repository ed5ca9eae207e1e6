# carsearch: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data/stanford-cars-dev
OUT    ?= demo-out
EXTRAS := weights,serve,bench,dev

.PHONY: venv demo test lint bench chromium clean

# The virtualenv is rebuilt when the dependency pins change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

# End to end on the dev images: embed with the offline ImageNet weights, index, search and classify.
demo: venv
	$(BIN)/carsearch embed $(DATA) --out $(OUT)/emb --backbone efficientnet_lite0
	@echo "embeddings, manifest.json and failures.jsonl are in $(OUT)/emb"

# Debian's chromium drives the browser test (Playwright uses the system binary; nothing is downloaded).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium: the browser test will be skipped"; }

test: venv chromium
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
