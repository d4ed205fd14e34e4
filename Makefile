# usersvc developer commands. `make run` and `make test` work on a fresh clone
# with only Python 3.11+ (and npm for the pinned buf) available.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := tools/node_modules/.bin/buf
PYTEST_ARGS ?=

.PHONY: venv run test lint proto proto-check buf-lint buf-breaking proto-release docker-lint \
	bench bench-soak bench-events bench-perf clean

venv: $(STAMP)

# Exact versions come from constraints.txt; pyproject.toml holds the ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "usersvc needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,speed,otel]'
	touch $@

# buf's version is exact in tools/package.json, and its per-platform binary
# packages are exact optionalDependencies of it: no lock file needed.
$(BUF): tools/package.json
	cd tools && npm install --no-save --no-package-lock --no-audit --no-fund --loglevel=error
	touch $@

# Serve on USERSVC_LISTEN_ADDR (default 127.0.0.1:50051). Without
# USERSVC_DATABASE_URL an embedded PostgreSQL under ./.usersvc/ is started and
# migrated by `usersvc serve` itself.
run: $(STAMP)
	@if [ -n "$$USERSVC_DATABASE_URL" ]; then $(BIN)/usersvc migrate; fi
	exec $(BIN)/usersvc serve

# The suite without the tests marked slow (the drills, the 100,000-user
# imports...: minutes of fixed-length load); SLOW=1 runs them too, as
# .ci/run does. A `-m` in PYTEST_ARGS overrides the selection. Uses
# USERSVC_TEST_DATABASE_URL when set, otherwise an embedded PostgreSQL
# under ./.usersvc/test-pgdata.
SLOW ?=
TEST_SELECTION = $(if $(filter 1,$(SLOW)),,-m "not slow")

test: $(STAMP) buf-lint buf-breaking proto-check
	$(BIN)/python -m pytest $(TEST_SELECTION) $(PYTEST_ARGS)

lint: $(STAMP) buf-lint buf-breaking proto-check docker-lint
	$(BIN)/ruff check usersvc tests scripts alembic bench
	$(BIN)/ruff format --check usersvc tests scripts alembic bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

buf-lint: $(BUF)
	$(BUF) lint

# The contract as last released: a buf image (descriptors without source
# info) committed under protos/. `buf breaking` fails when a change would
# break a client built against it (a field removed, renumbered, retyped...).
RELEASED_IMAGE := protos/usersvc-v1.binpb

buf-breaking: $(BUF)
	$(BUF) breaking --against $(RELEASED_IMAGE)

# On a release: record the current protos as the new baseline, and commit it.
proto-release: $(BUF) buf-lint
	$(BUF) build --exclude-source-info -o $(RELEASED_IMAGE)

# Dockerfile checks without a container engine: hadolint (pinned in the dev
# extra), failing on findings of any level, style included.
docker-lint: $(STAMP)
	$(BIN)/hadolint --failure-threshold style Dockerfile

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

# Benchmarks (never part of `make test`): usersvc against bare grpc.aio +
# asyncpg ceilings, a naive ORM-per-call server and the seeds' FastAPI design,
# loaded by h2load; see docs/performance.md. Filters: `make bench
# SCENARIOS=getuser ROUNDS=3 SECONDS=3` (scenarios: getuser, lookup, list,
# update, update-random, create, login, batch, import, batch-writes, events);
# more options
# through BENCH_ARGS (`$(BIN)/python -m bench --help`). Uses
# USERSVC_BENCH_DATABASE_URL, else a database usersvc_bench on the
# USERSVC_TEST_DATABASE_URL server, else the embedded PostgreSQL.
BENCH_ARGS ?=
BENCH_FLAGS = $(if $(SCENARIOS),--scenarios $(SCENARIOS)) $(if $(ROUNDS),--rounds $(ROUNDS)) \
	$(if $(SECONDS),--seconds $(SECONDS)) $(if $(SOAK),--soak) $(if $(DURATION),--duration $(DURATION))

# The bench extra (the FastAPI comparison) on top of the dev install.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP)
	@command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y --no-install-recommends nghttp2-client)
	$(BIN)/python -m bench $(BENCH_FLAGS) $(BENCH_ARGS)

# The events scenarios alone (relay throughput to JetStream, commit-to-PubAck
# lag, the cost of the event write in process, bench/events.py, and served,
# bench/event_served.py): `make bench SCENARIOS=events,events-served`.
bench-events:
	$(MAKE) bench SCENARIOS=events,events-served

# Where the event write's cost goes, served (perf samples of both servers'
# loads; RPC=CreateUser for the other one). Needs root for perf.
bench-perf: $(BENCH_STAMP)
	@command -v perf >/dev/null || (apt-get update -qq && apt-get install -y --no-install-recommends linux-perf)
	$(BIN)/python -m bench.perf_served $(if $(RPC),--rpc $(RPC)) $(BENCH_ARGS)

# The 10-minute memory soak; DURATION=60 for a smoke run.
bench-soak: $(BENCH_STAMP)
	@command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y --no-install-recommends nghttp2-client)
	$(BIN)/python -m bench --soak $(if $(DURATION),--duration $(DURATION)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) tools/node_modules .pytest_cache .mypy_cache .ruff_cache
