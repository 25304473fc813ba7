# Common commands. `make serve` and `make test` install what they need themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNS   ?= runs
INTENT_BUNDLE     ?= $(RUNS)/demo-intent/bundle
SUMMARIZER_BUNDLE ?= $(RUNS)/demo-summarizer/bundle

.PHONY: install serve demo-models test test-unit test-integration test-browser lint format bench reliability image clean

# The stamp is rebuilt whenever the dependency list changes.
$(BIN)/.installed: pyproject.toml requirements/torch.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pinning torch in the same resolve keeps pip on the CPU wheel instead of CUDA builds.
	$(BIN)/python -m pip install -q -c requirements/torch.txt -r requirements/torch.txt -e '.[test,bench]'
	touch $@

install: $(BIN)/.installed

$(INTENT_BUNDLE)/manifest.json: | $(BIN)/.installed
	$(BIN)/python -m training.train_intent training/recipes/intent/demo.yaml --output_dir $(RUNS)/demo-intent

$(SUMMARIZER_BUNDLE)/manifest.json: | $(BIN)/.installed
	$(BIN)/python -m training.train_summarizer training/recipes/summarizer/demo.yaml --output_dir $(RUNS)/demo-summarizer

demo-models: $(INTENT_BUNDLE)/manifest.json $(SUMMARIZER_BUNDLE)/manifest.json

serve: demo-models
	SUPPORTLENS_INTENT_BUNDLE=$(INTENT_BUNDLE) SUPPORTLENS_SUMMARIZER_BUNDLE=$(SUMMARIZER_BUNDLE) \
		$(BIN)/python -m service.server

# Headless Chromium for the browser test comes from Debian's packages.
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(BIN)/.installed browser-deps
	$(BIN)/python -m pytest -q tests

test-unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/integration

test-browser: $(BIN)/.installed browser-deps
	$(BIN)/python -m pytest -q tests/browser

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark in turn (about an hour on 2 CPU cores); they read ../shared/data by path
# and rewrite benchmarks/results/. Faithfulness and serving use the BANKING77 bundle.
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/banking77.py
	$(BIN)/python benchmarks/faithfulness.py --bundle runs/banking77/bundle --sample 500
	$(BIN)/python benchmarks/dialogsum.py --seeds 42 1 2
	$(BIN)/python benchmarks/serving.py --bundle runs/banking77/bundle

# The reliability table (benchmarks/results/reliability.md): fuzzing, overload, killed
# workers, slow clients, drain, each on a real server with the demo models (~10 minutes).
reliability: demo-models
	$(BIN)/python benchmarks/reliability.py

# The serving image with the demo models baked in (CONTAINER=podman works the same way).
CONTAINER ?= docker
image:
	$(CONTAINER) build -f deploy/Dockerfile --build-arg BAKE_DEMO_MODELS=1 -t supportlens:demo .

clean:
	rm -rf $(RUNS) .pytest_cache .ruff_cache
