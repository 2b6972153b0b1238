# The README's two commands: `make up` and `make test`.
SHELL := /bin/bash
N ?= 10
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: up test bench deps build clean

## Install what is missing, build, and bring up N containers (default 10).
up: deps build
	./target/release/nifty up $(N)
	./target/release/nifty list

## Install what is missing and run the whole test suite, privileged tests
## included (they fail instead of skipping when they cannot run).
test: deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	NIFTY_REQUIRE_PRIVILEGED=1 cargo test --all-targets
	bench/fleet --count 100 --smoke

## The benchmark of the README (N=1000 by hand: make bench N=1000).
bench: deps
	bench/fleet --count $(N)

deps:
	@./scripts/install-deps

build:
	cargo build --release

clean:
	cargo clean
