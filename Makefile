# The README's two commands: `make up` and `make test`.
SHELL := /bin/bash
N ?= 10
export PATH := $(HOME)/.cargo/bin:$(PATH)

RELEASE ?= bookworm

.PHONY: up test test-vm bench deps build clean

## Install what is missing, build, and bring up N containers (default 10).
up: deps build
	./target/release/nifty up $(N)
	./target/release/nifty list

## Install what is missing and run the whole test suite, privileged tests
## included (they fail instead of skipping when they cannot run), then the
## same nifty on Debian 12's own kernel with systemd as PID 1, in a VM.
test: deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	NIFTY_REQUIRE_PRIVILEGED=1 cargo test --all-targets
	bench/fleet --count 100 --smoke
	tests/vm/run --release bookworm

## The VM tests alone, on one release (make test-vm RELEASE=trixie).
test-vm: deps
	tests/vm/run --release $(RELEASE)

## The benchmark of the README (N=1000 by hand: make bench N=1000).
bench: deps
	bench/fleet --count $(N)

deps:
	@./scripts/install-deps

build:
	cargo build --release

clean:
	cargo clean
