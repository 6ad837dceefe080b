# TradeWatch — every command sets up what it needs on a fresh machine (Python venv, jars).
# Main targets: make demo | make test. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JARS := .tradewatch/jars
PROM := .tradewatch/tools/prometheus

.PHONY: demo test services doctor stop status bench setup venv jars system flink-cluster flink-stop clean

demo: setup                 ## the whole pipeline + dashboard; Ctrl-C stops everything it started
	$(PY) -m tradewatch.demo

TEST_WORKERS ?= 2
test:                       ## the full test suite (starts and stops its own services)
	@$(MAKE) --no-print-directory -j 3 venv jars system    # downloads side by side
	@# on TEST_WORKERS workers, each with Kafka and PostgreSQL of its own, longest modules first;
	@# then the tests whose timing budget is a promise to users, with nothing else running. One
	@# BLAS thread per worker: two workers' BLAS threads spinning on two cores made a model fit 10x slower
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not alone" --durations=15
	$(PY) -m pytest -m alone

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

bench: setup system         ## benchmarks; each prints JSON
	cd bench && ../$(PY) peer.py && ../$(PY) pipeline.py && ../$(PY) latency.py && ../$(PY) ingest.py && ../$(PY) replay.py && ../$(PY) quotes.py && ../$(PY) aggregate.py && ../$(PY) detect.py && ../$(PY) nab.py && ../$(PY) dashboard.py && ../$(PY) api.py && ../$(PY) report.py && ../$(PY) scale.py && ../$(PY) flink.py && ../$(PY) demo_start.py

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

system: $(PROM)/promtool    ## Debian packages the tests need: chromium (browser tests), docker-compose (checks
                            ## docker-compose.yml without an engine), promtool and prometheus (infra/prometheus/)
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing — sudo apt-get install$$missing (needed by the tests)"; exit 1; fi; fi

# promtool and prometheus from Debian's prometheus package, unpacked here, not installed: they check,
# unit-test and run infra/prometheus/ in the tests (installing the package starts a server on :9090)
$(PROM)/promtool:
	rm -rf $(PROM) && mkdir -p $(PROM)/deb
	cd $(PROM)/deb && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; } \
	  || { echo "cannot download Debian's prometheus package (apt-get update needs root)"; exit 1; }; }
	dpkg-deb -x $(PROM)/deb/prometheus_*.deb $(PROM)/deb/files
	mv $(PROM)/deb/files/usr/bin/prometheus $(PROM)/deb/files/usr/bin/promtool $(PROM)/ && rm -rf $(PROM)/deb

clean: stop                 ## remove local data (keeps the venv and jars)
	rm -rf .tradewatch/demo .tradewatch/test .tradewatch/test-gw* .tradewatch/test-kafka3 .tradewatch/e2e-* .tradewatch/bench
