# lotflow — every target installs what it needs (idempotently) first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_STAMP := var/.apt-installed

.DEFAULT_GOAL := help
.PHONY: help install compile system-deps demo review-demo learning-demo review-timing test lint unit integration bench kafka-start kafka-stop clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

system-deps: $(APT_STAMP) ## Java 17, ZooKeeper 3.8 jars (for the local broker), promtool, chromium (browser test), a C compiler (the compiled core)
$(APT_STAMP): Makefile
	@missing=""; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	[ -f /usr/share/java/zookeeper-3.8.0.jar ] || missing="$$missing libzookeeper-java"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@mkdir -p var && touch $@

install: system-deps $(STAMP) ## create .venv, install lotflow with its dev tools, compile its core (mypyc)
	@# the processor's hot modules as C extensions (lotflow/compiled.py): rebuilt when a source
	@# changed, a no-op otherwise; a machine without a C compiler runs lotflow from its sources
	@$(BIN)/python -m lotflow.compile_core

compile: install ## build the compiled core (lotflow/_compiled; install does it); python -m lotflow.compile_core --clean removes it

$(STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: install ## run the whole pipeline on a local broker + embedded ClickHouse and print a summary
	$(BIN)/lotflow demo $(DEMO_ARGS)

review-demo: install ## the demo, then the review service on its data with a demo user per role (Ctrl-C stops)
	$(BIN)/lotflow demo --review $(DEMO_ARGS)

learning-demo: install ## the learning run: simulated reviewer through the API, learning curves -> var/learning.json, .png
	$(BIN)/lotflow learning-demo $(LEARNING_ARGS)

lint: install ## ruff + mypy
	$(BIN)/ruff check .
	@# mypy cannot follow the package-dir mapping of an editable install (lotflow.streams is
	@# streams/, ...): it checks a tree of links laid out as the installed package, so that
	@# imports between the parts are checked instead of read as Any.
	@$(BIN)/python -m lotflow.compile_core --link-tree var/typecheck
	cd var/typecheck && $(abspath $(BIN))/mypy --config-file ../../pyproject.toml --cache-dir ../mypy-cache lotflow

test: install lint ## lint, then every test (unit + integration on a real broker and ClickHouse)
	$(BIN)/pytest -q

unit: install ## only the unit tests
	$(BIN)/pytest -q tests/unit

integration: install ## only the integration tests
	$(BIN)/pytest -q tests/integration

bench: install ## raw vs Faust vs pipeline throughput, latency at 1,000/s, sink rows/s -> var/bench.json
	$(BIN)/python load-tests/bench.py $(BENCH_ARGS)

review-timing: install ## decision -> release p95 and queue page p95 with 10k open exceptions -> var/review-timing.json
	$(BIN)/python load-tests/review_timing.py $(REVIEW_TIMING_ARGS)

kafka-start: install ## start the local broker (var/kafka)
	$(BIN)/lotflow kafka start

kafka-stop: install ## stop the local broker started by kafka-start
	$(BIN)/lotflow kafka stop

clean: ## remove var/ (broker data, embedded ClickHouse, results), the compiled core and .venv
	-$(BIN)/lotflow kafka stop 2>/dev/null
	rm -rf var $(VENV) *.egg-info lotflow/_compiled lotflow/_compiled.new lotflow/_compiled.old
