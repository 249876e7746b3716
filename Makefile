# mxguard — the two commands a newcomer needs are `make run` and `make test`.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: run build test deps fmt lint unit e2e fuzz bench

# `make -j test` must still run the steps in order.
.NOTPARALLEL:

## run: build and run the guard's demo (MTA stand-in on loopback, a clean delivery, an early talker caught)
run:
	$(CARGO) run --release -p mxguard -- demo

## build: debug build of the daemon (target/debug/mxguard, what the e2e tests run) and the
## benchmark helper (target/debug/mxbench, for the benchmark smoke test)
build:
	$(CARGO) build -p mxguard -p mxguard-bench

## test: install what the tests need, then format check, clippy, unit tests, build, end-to-end tests
test: deps lint unit build e2e

## deps: apt (postfix, swaks, iptables, haproxy, ...) and pytest, only what is missing
deps:
	tests/install-deps.sh
	bench/install-deps.sh

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## lint: format check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## unit: the workspace's Rust tests
# The property tests (crates/mxguard-smtp/tests/properties.rs) explore from a
# fixed seed in `make test` so CI is repeatable; `make unit PROPTEST_RNG_SEED=`
# (empty) explores from a random seed, as a plain `cargo test` does.
PROPTEST_RNG_SEED ?= 1
unit:
	PROPTEST_RNG_SEED=$(PROPTEST_RNG_SEED) $(CARGO) test --workspace

## e2e: end-to-end tests against real peers (root for the namespace tests)
e2e:
	$(PYTHON) -m pytest tests/e2e -v $(PYTEST_ARGS)

## fuzz: run the cargo-fuzz targets of the turn tracker and body scanner (FUZZ_SECONDS each, default 20);
## the same properties run in `make test` through proptest (crates/mxguard-smtp/tests/properties.rs)
fuzz:
	tests/fuzz-smoke.sh

## bench: the benchmark suite (bench/run.py, minutes, release builds; writes docs/benchmarks.md):
## held sessions, connection rate, added latency and bulk throughput against a direct connection,
## HAProxy and postscreen, the turn tracker (criterion) and prefix lookups at 10^6 prefixes, limiter
## decisions/s and memory per tracked key (mxguard-policy); then fleet decisions/s and added latency
## through a local redis-server (mxguard). BENCH_ARGS="--only held,bulk --runs 5" for a part of the
## suite. `make test` runs a seconds-long smoke version (tests/e2e/test_bench_smoke.py).
bench:
	bench/install-deps.sh
	$(CARGO) build --release -p mxguard -p mxguard-bench
	$(PYTHON) bench/run.py $(BENCH_ARGS)
	$(CARGO) bench -p mxguard --bench fleet
