# Thin targets; the work is in the packages and in .ci/run.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MEMBERS := shared/framing shared/servicekit services/echo services/cmdexec services/udp services/probe

SERVICES    := echo cmdexec udp probe
VERSION     := $(shell cat VERSION)
IMAGE_TAG   ?= $(VERSION)
LOCAL_BASE  ?= wirekit-base:local
# `make up OFFLINE=1`: the compose stack on a machine without an image registry (local base,
# Prometheus from Debian's package, no Grafana or Jaeger: deploy/compose.offline.yaml).
ifdef OFFLINE
BASE_IMAGE  ?= $(LOCAL_BASE)
endif
# The official image for real users; CI and registry-less machines use `make base-image` and
# BASE_IMAGE=wirekit-base:local.
BASE_IMAGE  ?= python:3.11-slim-bookworm
COMPOSE     ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
STACK_NAME  ?= wirekit
STACK       := $(COMPOSE) -p $(STACK_NAME) -f deploy/compose.yaml $(if $(OFFLINE),-f deploy/compose.offline.yaml) $(foreach p,$(PROFILES),--profile $(p))

.PHONY: FORCE help install run check test test-compiled accel pure lint fmt lock clean wheelhouse images base-image up down stack-up stack-down bench bench-udp bench-instr soak mutants
.DEFAULT_GOAL := help

#: The virtualenv is up to date when this stamp is newer than the pins and the members' metadata.
STAMP   := $(VENV)/.installed

help: ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): requirements/dev.txt VERSION $(addsuffix /pyproject.toml,$(MEMBERS)) | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes -r requirements/dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation $(addprefix -e ,$(MEMBERS))
	touch $@

#: cmdexec's exec wrapper that sets rlimits before a command's first instruction: a static binary,
#: installed beside the venv's python and in the image. Built against musl (Debian's musl-tools:
#: 34 KB, +0.06 ms per command) where musl-gcc is found, else glibc (680 KB, +0.36 ms).
HELPER    := $(BIN)/wirekit-limits
HELPER_CC ?= $(shell command -v musl-gcc || echo $(CC))
READY     := $(STAMP) $(HELPER)

#: Which compiler built it: a machine that gains musl-gcc rebuilds it (the stamp changes only
#: when the compiler does, so an up-to-date tree rebuilds nothing).
HELPER_CC_STAMP := $(VENV)/.wirekit-limits-cc

$(HELPER_CC_STAMP): FORCE | $(BIN)/python
	@echo '$(HELPER_CC)' | cmp -s - $@ || echo '$(HELPER_CC)' > $@

$(HELPER): services/cmdexec/helper/wirekit-limits.c $(HELPER_CC_STAMP) | $(BIN)/python
	$(HELPER_CC) -O2 -static -s -Wall -Wextra -Werror -o $@ $<

FORCE:

install: $(READY) ## venv with the pinned, hashed dev set plus the members (editable); only when stale

run: $(READY) ## echo on loopback: raw 7000, framed 7001, metrics 9700 (makes the venv first)
	env WIREKIT_ECHO_HOST=127.0.0.1 $(BIN)/wirekit-echo

check: ## everything CI checks, on a fresh Debian 12 machine: installs what it needs, then lint, images, tests
	bash .ci/check

test: $(READY) ## the whole suite, quickly (integration tests skip without Docker unless CI is set)
	$(BIN)/pytest

TEST_DIRS := $(addsuffix /tests,$(MEMBERS)) tests

lint: $(READY) ## ruff, ruff format --check, mypy --strict (the packages, then each test folder)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	for d in $(TEST_DIRS); do MYPYPATH=tests $(BIN)/mypy --explicit-package-bases $$d/*.py || exit 1; done

fmt: $(READY) ## ruff --fix, ruff format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(READY) ## the benchmark matrix (~15 min, loopback): bench/results/latest.{md,json}, throughput.png
	command -v xinetd >/dev/null && command -v sshd >/dev/null && command -v musl-gcc >/dev/null && \
	  command -v prometheus-smokeping-prober >/dev/null && command -v prometheus-blackbox-exporter >/dev/null || \
	  apt-get install -y -qq --no-install-recommends xinetd openssh-server openssh-client musl-tools \
	    prometheus-smokeping-prober prometheus-blackbox-exporter >/dev/null
	$(MAKE) --no-print-directory $(HELPER)
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes -r requirements/bench.txt
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-udp: $(READY) ## udp alone, before/after: BENCH_ARGS='--baseline REV' (bench/udp_bench.py, ~2 min)
	$(BIN)/python bench/udp_bench.py $(BENCH_ARGS)

bench-instr: $(READY) ## instructions per message under callgrind, deterministic: BENCH_ARGS='--baseline REV' (bench/instr.py, ~30 min)
	command -v valgrind >/dev/null || apt-get install -y -qq --no-install-recommends valgrind >/dev/null
	$(BIN)/python bench/instr.py $(BENCH_ARGS)

soak: $(READY) ## 1,000 concurrent framed connections x 20 random frames, twice, byte-exact; then a 1 MiB-frame burst: RSS back within 2x (bench/soak.py)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)
	$(BIN)/python bench/soak.py --frames 4 --largest-kib 1000

mutants: $(READY) ## one mutation per module, each must make a test fail (tests/mutants.py; ~10 min)
	$(BIN)/python tests/mutants.py

lock: ## re-pin requirements/*.txt with hashes (needs uv; records no index URLs)
	cd requirements && uv pip compile requirements.in --generate-hashes --no-header --python-version 3.11 -o runtime.txt -q
	cd requirements && uv pip compile dev.in --generate-hashes --no-header --python-version 3.11 -o dev.txt -q
	cd requirements && uv pip compile bench.in --generate-hashes --no-header --python-version 3.11 -o bench.txt -q

wheelhouse: $(READY) ## pinned dependencies (hash-checked), wirekit wheels (hot modules compiled where cc is found) and wirekit-limits, for hermetic image builds
	rm -rf wheelhouse && mkdir -p wheelhouse
	cp $(HELPER) wheelhouse/wirekit-limits
	$(BIN)/pip download -q --disable-pip-version-check --require-hashes --no-deps \
	  --only-binary :all: -r requirements/runtime.txt -d wheelhouse
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
	  -w wheelhouse $(filter-out $(ACCEL_MEMBERS),$(MEMBERS))
	@echo 'wheelhouse: $(ACCEL_MEMBERS) $(if $(ACCEL_WHEELS),compiled (mypyc; C),pure Python (no C compiler, Python not 3.11, or ACCEL=0))'
	status=0; $(call ACCEL_HOOKS,$(if $(ACCEL_WHEELS),true,false)) $(BIN)/pip wheel -q \
	  --disable-pip-version-check --no-deps --no-build-isolation -w wheelhouse $(ACCEL_MEMBERS) || status=$$?; \
	  rm -f $(ACCEL_SO); exit $$status

#: The members whose per-message path has a compiled build, and what that build leaves beside
#: the sources: framing's codec by mypyc (hatch-mypyc, its pyproject.toml), echo's per-read
#: path and udp's per-datagram path in C (_hot.c, by tools/hatch_cext.py). ACCEL_HOOKS turns
#: both hooks on or off. `ACCEL=0` builds pure-Python wheels even where a C compiler is found.
#: The images' wheels are compiled only by a Python 3.11 (the images' python3.11 installs no
#: other tag); the Dockerfile falls back to the pure modules where the compiled ones do not load
#: (another libc).
ACCEL_MEMBERS := shared/framing services/echo services/udp
ACCEL_SO      := $(addsuffix /src/*/*.so,$(ACCEL_MEMBERS))
ACCEL_ON      := $(if $(filter 0,$(ACCEL)),,$(shell command -v $(CC) >/dev/null && echo 1))
ACCEL_HOOKS    = HATCH_BUILD_HOOK_ENABLE_MYPYC=$(1) HATCH_BUILD_HOOK_ENABLE_CUSTOM=$(1)
ACCEL_WHEELS   = $(and $(ACCEL_ON),$(filter 1,$(shell $(BIN)/python -c 'import sys; print(int(sys.version_info[:2] == (3, 11)))')))

accel: $(READY) ## compile the hot modules in place (mypyc, C): the venv, make test and make bench then run them; make pure undoes it
	$(if $(ACCEL_ON),,$(error no C compiler ($(CC)): the compiled build cannot be made here))
	rm -rf build/accel
	$(call ACCEL_HOOKS,true) $(BIN)/pip wheel -q --disable-pip-version-check --no-deps \
	  --no-build-isolation -w build/accel $(ACCEL_MEMBERS)
	rm -rf build/accel
	$(BIN)/python -m wirekit_servicekit.accel --expect compiled wirekit_echo wirekit_udp

pure: ## remove what make accel compiled in place: back to the pure-Python modules
	rm -f $(ACCEL_SO)

test-compiled: accel ## the framing, echo and udp tests against the compiled build (then back to pure)
	status=0; $(BIN)/pytest -p no:cacheprovider $(addsuffix /tests,$(ACCEL_MEMBERS)) || status=$$?; \
	  rm -f $(ACCEL_SO); exit $$status

images: wheelhouse ## one image per service: wirekit-<service>:$(IMAGE_TAG)
	for s in $(SERVICES); do \
	  docker build -q --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
	    --target $$s -t wirekit-$$s:$(IMAGE_TAG) . || exit 1; \
	done
	docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^wirekit-'

base-image: ## wirekit-base:local from Debian (debootstrap + docker import), for registry-less machines
	bash deploy/base/build-base-image.sh $(LOCAL_BASE)

up: wheelhouse ## the compose stack: services, Prometheus (:9090), Grafana (:3000), Jaeger (:16686)
ifdef OFFLINE
	docker image inspect $(LOCAL_BASE) >/dev/null 2>&1 || $(MAKE) base-image
endif
	bash deploy/cmdexec-credentials.sh $${CMDEXEC_TOKEN_FILE:-deploy/secrets/cmdexec_token} \
	  $${CMDEXEC_POLICY_FILE:-deploy/secrets/cmdexec-policy.yaml}
	BASE_IMAGE=$(BASE_IMAGE) IMAGE_TAG=$(IMAGE_TAG) $(STACK) up -d --build

down: ## stop the stack (give OFFLINE=1 if it was started so); its data volume stays
	IMAGE_TAG=$(IMAGE_TAG) $(STACK) down

SWARM_STACK ?= wirekit
stack-up: images ## 3 replicas of each service + Prometheus on Docker Swarm (deploy/stack.yaml)
	docker build -q --build-arg BASE_IMAGE=$(BASE_IMAGE) -t wirekit-prometheus:$(IMAGE_TAG) deploy/prometheus
	IMAGE_TAG=$(IMAGE_TAG) bash deploy/swarm.sh up $(SWARM_STACK)

stack-down: ## remove the swarm stack (the swarm itself stays: docker swarm leave --force)
	IMAGE_TAG=$(IMAGE_TAG) bash deploy/swarm.sh down $(SWARM_STACK)

clean: ## remove the venv, the wheelhouse, caches and the compiled modules
	rm -rf $(VENV) wheelhouse .mypy_cache .pytest_cache .ruff_cache .hypothesis
	rm -f $(ACCEL_SO)
