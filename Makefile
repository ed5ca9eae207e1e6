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

# End to end on the dev images: embed with the offline ImageNet weights, index, search, classify, bench.
# Three photos are taken out of the index (ids 0-2 = images/00001-00003.jpg, the first three records) so
# the classify step answers for cars the index has never seen.
demo: venv
	$(BIN)/carsearch embed $(DATA) --out $(OUT)/emb --backbone efficientnet_lite0
	$(BIN)/carsearch index build $(OUT)/emb --out $(OUT)/index
	$(BIN)/carsearch index remove $(OUT)/index 0 1 2
	$(BIN)/carsearch search --index $(OUT)/index $(DATA)/images/00001.jpg -k 5
	$(BIN)/carsearch classify --index $(OUT)/index $(DATA)/images/00001.jpg $(DATA)/images/00002.jpg $(DATA)/images/00003.jpg
	$(BIN)/carsearch bench $(OUT)/emb --out $(OUT)/report --factory Flat --factory HNSW32 --no-sweep --no-peers
	@echo "demo outputs in $(OUT)/: emb/ (shards, manifest.json, failures.jsonl), index/, report/report.md"

# Debian's chromium drives the browser test (Playwright uses the system binary; nothing is downloaded).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium: the browser test will be skipped"; }

test: venv chromium
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
