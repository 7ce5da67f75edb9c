# Thin targets; the work is in the packages and in .ci/run.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MEMBERS := shared/framing shared/servicekit services/echo

.PHONY: install run test lint fmt lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python ## venv with the pinned, hashed dev set plus the members (editable)
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes -r requirements/dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation $(addprefix -e ,$(MEMBERS))

run: ## echo on loopback: raw 7000, framed 7001, metrics 9700
	WIREKIT_ECHO_HOST=127.0.0.1 $(BIN)/wirekit-echo

test: ## the whole suite (what .ci/run calls)
	$(BIN)/pytest

lint: ## ruff, ruff format --check, mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: ## re-pin requirements/*.txt with hashes (needs uv; records no index URLs)
	cd requirements && uv pip compile requirements.in --generate-hashes --no-header --python-version 3.11 -o runtime.txt -q
	cd requirements && uv pip compile dev.in --generate-hashes --no-header --python-version 3.11 -o dev.txt -q

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
