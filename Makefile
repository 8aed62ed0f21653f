# The two commands: `make demo` and `make test`. Both do all set-up first (idempotent).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export LIBTORCH := $(CURDIR)/.venv/torch
export LD_LIBRARY_PATH := $(CURDIR)/.venv/torch/lib:$(LD_LIBRARY_PATH)
CARGO ?= cargo

.PHONY: setup build wheel wheel-test experiments dashboard demo demo-lm test lint bench fuzz fmt

setup:
	@bash scripts/setup.sh

## What volunteers and ML teams run: the coordinator and the worker, without test hooks.
build: setup
	$(CARGO) build --release -p coordinator -p worker

## The volunteer's install: a Python wheel (maturin, bin bindings) of the worker as
## `dtrain-worker`, depending on torch==2.11.0: target/wheels/dtrain_worker-*.whl.
wheel: setup
	maturin build --release -m wheel/Cargo.toml --auditwheel skip --out target/wheels

## The wheel as a volunteer installs it: pip into a fresh venv (torch from pip), then
## `dtrain-worker --join` trains a short run of a local coordinator.
wheel-test: setup
	$(CARGO) build --bin coordinator
	bash scripts/wheel_test.sh

## The experiments, with coordinator and worker binaries built with the test hooks they
## use (slowdowns, adversaries), in target/experiments/ (profile `experiments`: release).
experiments: setup
	$(CARGO) build --profile experiments --bins

## Screenshots of the status server's dashboard over a running swarm with a cheater
## (headless Chromium): results/dashboard/dashboard.png and dashboard-phone.png.
dashboard: experiments
	target/experiments/experiments dashboard

## The main job: a coordinator and 4 worker processes on loopback train a CNN on Fashion-MNIST.
demo: build
	bash scripts/demo.sh

## A small Llama-style language model on byte-level tokens of Debian's fortunes, DiLoCo
## rounds over 4 worker processes; prints the validation loss curve.
demo-lm: build
	bash scripts/demo_lm.sh

## The whole test suite (what CI runs).
## Without incremental compilation: a clean build gains nothing from it, and its cache would
## take another gigabyte of CI's disk.
test: export CARGO_INCREMENTAL = 0
test: setup
	$(CARGO) check -p coordinator -p worker --bins
	$(CARGO) build --bins
	$(CARGO) test --workspace -- --test-threads=1
	bash scripts/wheel_test.sh

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p coordinator -p worker --all-targets -- -D warnings

## Codec throughput (criterion), then the README's table in results/bench-codecs.md.
bench: setup
	$(CARGO) bench -p compression
	python3 scripts/bench_table.py > results/bench-codecs.md
	cat results/bench-codecs.md

## Every cargo-fuzz target for FUZZ_SECONDS each (installs cargo-fuzz when missing; the
## sanitizer flags need nightly features, which RUSTC_BOOTSTRAP=1 enables on this toolchain).
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

fmt:
	$(CARGO) fmt --all
