# carsearch: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data/stanford-cars-dev
OUT    ?= demo-out
EXTRAS := weights,openvino,onnx,serve,bench,cluster,dev

.PHONY: venv demo demo-cpu-hour test lint bench chromium clean

# The virtualenv is rebuilt when the dependency pins change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

# End to end on the dev images, the tuned way: embed with the offline ImageNet weights, build a frozen
# index and a car-tuned one (`--tune head`: a projection head trained on the cached embeddings), compare
# them on the dev protocol, then search and classify three photos. Those three (images 00001-00003, the
# first rows of labels.csv, not chosen by result) are left out of the collection, so neither index nor
# head has seen them.
QUERIES := $(DATA)/images/00001.jpg $(DATA)/images/00002.jpg $(DATA)/images/00003.jpg
demo: venv
	mkdir -p $(OUT)
	grep -v -E '^images/0000[123][.]jpg,' $(DATA)/labels.csv > $(OUT)/collection.csv
	$(BIN)/carsearch embed $(DATA) --labels $(OUT)/collection.csv --out $(OUT)/emb --backbone efficientnet_lite0
	$(BIN)/carsearch index build $(OUT)/emb --out $(OUT)/index-frozen --frozen
	$(BIN)/carsearch index build $(OUT)/emb --out $(OUT)/index --tune head
	$(BIN)/carsearch search --index $(OUT)/index $(DATA)/images/00001.jpg -k 5
	@echo "--- before: frozen ImageNet features"; $(BIN)/carsearch -q classify --index $(OUT)/index-frozen $(QUERIES)
	@echo "--- after: car-tuned (index build --tune head)"; $(BIN)/carsearch -q classify --index $(OUT)/index $(QUERIES)
	@echo "--- the true labels:"; grep -E '^images/0000[123][.]jpg,' $(DATA)/labels.csv
	$(BIN)/python benchmarks/tuned_accuracy.py $(OUT)/emb --work $(OUT)/accuracy | tee $(OUT)/accuracy.md
	$(BIN)/carsearch bench $(OUT)/emb --out $(OUT)/report --factory Flat --factory HNSW32 --no-sweep --no-peers
	@echo "demo outputs in $(OUT)/: emb/, index-frozen/, index/ (tuned: head/, embeddings/), accuracy.md, report/report.md"

# The cpu-hour preset on the same collection (under an hour on 2 cores): the last three stages of the
# backbone trained on cached activations of the photos, then the same three photos classified.
demo-cpu-hour: venv
	mkdir -p $(OUT)
	grep -v -E '^images/0000[123][.]jpg,' $(DATA)/labels.csv > $(OUT)/collection.csv
	$(BIN)/carsearch embed $(DATA) --labels $(OUT)/collection.csv --out $(OUT)/emb --backbone efficientnet_lite0
	$(BIN)/carsearch index build $(OUT)/emb --out $(OUT)/index-cpu-hour --tune cpu-hour
	@echo "--- car-tuned (index build --tune cpu-hour)"; $(BIN)/carsearch -q classify --index $(OUT)/index-cpu-hour $(QUERIES)
	@echo "--- the true labels:"; grep -E '^images/0000[123][.]jpg,' $(DATA)/labels.csv

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
