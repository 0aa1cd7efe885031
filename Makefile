# The README's two commands are `make run` and `make test`. Each sets up its own virtual environment
# from requirements.lock (exact versions) the first time, and again whenever the lock changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# checkov, the IaC scanner of `make lint`, has its own virtual environment: its ~90 pinned
# dependencies would clash with the project's. Created on first use, like .venv.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: install run broker test lint checkov unit durations bench bench-worker bench-growthbook sdk-drill lock schemas docs clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(CHECKOV_STAMP): requirements-checkov.lock
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-checkov.lock
	touch $(CHECKOV_STAMP)

## The product's main job: the demo. Each run starts its own out/rows.jsonl and out/dead-letters.jsonl (rows
## appended run after run would add up to a sample-ratio mismatch in the report). It runs on the broker of
## `make broker` when its connection string is exported here (the embedded broker's carries
## UseDevelopmentEmulator=true, so a real namespace is never sent demo requests), else on its own.
OUT ?= out
BROKER_PORT ?= 5672
DEMO_BROKER = $(if $(findstring UseDevelopmentEmulator=true,$(AB_WORKER_SERVICEBUS_CONNECTION_STRING)),,--local)
run: $(STAMP)
	mkdir -p $(OUT)
	rm -f $(OUT)/rows.jsonl $(OUT)/dead-letters.jsonl
	AB_WORKER_CONTEXT_ALLOW_LIST=campaign $(BIN)/ab-worker run --config deploy/experiments.yaml \
		$(DEMO_BROKER) --demo --drain --rows $(OUT)/rows.jsonl --dead-letters $(OUT)/dead-letters.jsonl

## The embedded broker in the foreground, kept up for the tour: it prints the lines to paste in another terminal.
broker: $(STAMP)
	@$(BIN)/ab-worker broker --port $(BROKER_PORT)

## Lint, type-check and the whole default test suite (unit + integration tiers).
test: lint
	$(BIN)/pytest

lint: $(STAMP) checkov
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## Scan deploy/ (Dockerfile, Kubernetes manifests, Bicep, ARM, and every file for secrets) as a
## security reviewer would. Accepted findings are skipped beside the resource with their reason
## (docs/deployment.md lists them). Offline: no guideline download, no update check.
checkov: $(CHECKOV_STAMP)
	CKV_SKIP_PACKAGE_UPDATE_CHECK=true LOG_LEVEL=ERROR $(CHECKOV_VENV)/bin/checkov --directory deploy \
		--framework dockerfile kubernetes bicep arm secrets --skip-download --compact --quiet

unit: $(STAMP)
	$(BIN)/pytest tests/unit -m "not integration"

## Refresh tests/durations.json from a whole run: the suite starts its longest tests first by it.
durations: $(STAMP)
	$(BIN)/pytest --record-durations

bench: $(STAMP)
	$(BIN)/python -m bench.bench_assignment

## Latency, throughput against bare SDK loops, network delay and process scaling, each side by side.
bench-worker: $(STAMP)
	$(BIN)/python -m bench.bench_worker

## The SDK internals drill: in a scratch virtual environment, the project's lock with the newest
## azure-servicebus, azure-kusto-data and azure-kusto-ingest on top; runs the contract test of each guard
## around their private surface there and prints which guards hold, fail closed or are broken
## (docs/architecture.md), so moving a pin is a measured decision. Not part of `make test`: it downloads.
## SDK_DRILL_PACKAGES="azure-servicebus==7.14.3" tries given releases instead of the newest.
SDK_DRILL_VENV ?= .venv-sdk-drill
SDK_DRILL_PACKAGES ?= azure-servicebus azure-kusto-data azure-kusto-ingest
$(SDK_DRILL_VENV)/.installed: requirements.lock
	rm -rf $(SDK_DRILL_VENV)
	$(PYTHON) -m venv $(SDK_DRILL_VENV)
	$(SDK_DRILL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(SDK_DRILL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

sdk-drill: $(SDK_DRILL_VENV)/.installed
	$(SDK_DRILL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(SDK_DRILL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade $(SDK_DRILL_PACKAGES)
	$(SDK_DRILL_VENV)/bin/python -m tests.sdk_drill

## ExperimentRegistry.assign beside the growthbook package's run() on the same full-featured experiment.
## growthbook is a benchmark-only extra (pyproject's [bench]): installed here, never in the image.
bench-growthbook: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(BIN)/python -m bench.bench_growthbook

schemas: $(STAMP)
	$(BIN)/python -m schemas.generate
	$(BIN)/python -m tests.conformance_cases
	$(BIN)/python -m tests.cohort_cases
	$(BIN)/python -m tests.allocation_cases

## The manual's generated page: docs/configuration.md from the settings model (a test fails when it is stale).
docs: $(STAMP)
	$(BIN)/python -m worker.service.configuration_page > docs/configuration.md

## Re-pin every dependency after changing pyproject.toml: requirements.lock (development: the
## runtime, the local broker and the test tools) and requirements-runtime.lock (the image: runtime only,
## at the same versions).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e ".[local,test]"
	{ echo "# Exact versions for a reproducible install: regenerate with \`make lock\` after changing pyproject.toml."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable; } > requirements.lock
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet --constraint requirements.lock .
	{ echo "# The image's runtime-only pins (same versions as requirements.lock): regenerate with \`make lock\`."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^ab-assignment-worker'; } > requirements-runtime.lock
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet "$$(grep '^checkov==' requirements-checkov.lock)"
	{ echo "# checkov and its dependencies, in their own virtual environment (.venv-checkov): regenerate with \`make lock\`."; \
	  .lock-venv/bin/python -m pip freeze; } > requirements-checkov.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(SDK_DRILL_VENV) out .pytest_cache .mypy_cache .ruff_cache
