# TradeWatch — every command sets up what it needs on a fresh machine (Python venv, jars).
# Main targets: make demo | make test. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JARS := .tradewatch/jars

.PHONY: demo test services doctor stop status bench setup venv jars browser compose flink-cluster flink-stop clean

demo: setup                 ## the whole pipeline + dashboard; Ctrl-C stops everything it started
	$(PY) -m tradewatch.demo

test: setup browser compose ## the full test suite (starts and stops its own services)
	$(PY) -m pytest

services: setup             ## start Kafka (KAFKA_BROKERS nodes) and PostgreSQL (harmless when running)
	$(PY) -m tradewatch.stack start

doctor: venv                ## check Java, jars, Kafka, PostgreSQL, the stages, ports and disk
	$(PY) -m tradewatch doctor

flink-cluster: setup       ## a local Flink standalone cluster: JobManager + TASKMANAGERS (2) TaskManagers
	$(PY) -m tradewatch.flink_cluster start --taskmanagers $${TASKMANAGERS:-2}

flink-stop:                 ## stop that cluster
	$(PY) -m tradewatch.flink_cluster stop

stop:                       ## stop Kafka and PostgreSQL
	$(PY) -m tradewatch.stack stop

status:
	$(PY) -m tradewatch.stack status

bench: setup browser        ## benchmarks; each prints JSON
	cd bench && ../$(PY) peer.py && ../$(PY) pipeline.py && ../$(PY) ingest.py && ../$(PY) aggregate.py && ../$(PY) detect.py && ../$(PY) dashboard.py && ../$(PY) api.py && ../$(PY) report.py && ../$(PY) scale.py && ../$(PY) flink.py && ../$(PY) demo_start.py

setup: venv jars

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

jars: $(JARS)/.fetched
$(JARS)/.fetched: infra/pom.xml
	rm -rf $(JARS) && mkdir -p $(JARS)
	mvn -q -B -f infra/pom.xml -P kafka dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(JARS)/kafka
	mvn -q -B -f infra/pom.xml -P flink dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(JARS)/flink
	touch $@

browser:                    ## headless Chromium for the dashboard's browser test (Debian package)
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium (needed by tests/e2e)"; exit 1; fi; }

compose:                    ## Debian's docker-compose: validates docker-compose.yml without an engine (tests)
	@command -v docker-compose >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	  else echo "docker-compose is missing: sudo apt-get install docker-compose (needed by tests/unit/test_config.py)"; exit 1; fi; }

clean: stop                 ## remove local data (keeps the venv and jars)
	rm -rf .tradewatch/demo .tradewatch/test .tradewatch/test-kafka3 .tradewatch/e2e-* .tradewatch/bench
