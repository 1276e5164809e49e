# ferry — the two commands of a newcomer are `make run` and `make test`.
#
# Everything builds with the release profile and the whole workspace: the
# RocksDB C++ library takes 16-30 minutes to compile on 2 cores, so run, test,
# clippy and bench must share one build of it. Cargo rebuilds it whenever the
# features of its build dependencies change, and `-p <crate>` selections or a
# different profile can change them: so every target here builds with
# `--workspace` and the `release` profile (also `cargo bench --profile release`).
# Point CARGO_TARGET_DIR at a persistent directory to keep it warm.

SHELL := /bin/bash
CARGO ?= cargo
PROFILE := --release
export CARGO_TARGET_DIR ?= $(CURDIR)/target

# Arguments passed to `ferry serve` by `make run`, e.g. make run ARGS="--listen 127.0.0.1:7600"
ARGS ?=
FUZZ_SECONDS ?= 300

.PHONY: all deps build run test bench fuzz fmt lint dist clean

all: build

## deps: install what a fresh Debian machine lacks for the build.
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }
	@missing=""; \
	for pkg in libclang-dev clang g++ make pkg-config; do \
	  dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt 2>/dev/null || true
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy 2>/dev/null || true

## build: the ferry and ferry-bench binaries.
build: deps
	$(CARGO) build $(PROFILE) --workspace --bins

## run: start one node with defaults (clients on :7600, ops HTTP on 127.0.0.1:7601, data in ./data).
run: build
	$(CARGO_TARGET_DIR)/release/ferry serve $(ARGS)

## test: format check, clippy with -D warnings, then every test of the workspace.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(PROFILE) --workspace --all-targets -- -D warnings
	$(CARGO) build $(PROFILE) --workspace --bins
	$(CARGO) test $(PROFILE) --workspace

## bench: criterion micro-benches, then the short load suite on a spawned server.
bench: build
	$(CARGO) bench --profile release --workspace
	$(CARGO_TARGET_DIR)/release/ferry-bench suite --spawn

## fuzz: run every fuzz target (FUZZ_TARGETS, as crate-dir:target) for FUZZ_SECONDS each (default 300).
FUZZ_TARGETS ?= protocol:decode_frames protocol:decode_envelope protocol:requests nsq:decode_nsq_frames auth:verify_token auth:secret_file admin-api:admin_bodies
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for t in $(FUZZ_TARGETS); do \
	  (cd $${t%%:*} && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --fuzz-dir fuzz $${t#*:} -- -max_total_time=$(FUZZ_SECONDS)) || exit 1; \
	done

fmt:
	$(CARGO) fmt --all

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(PROFILE) --workspace --all-targets -- -D warnings

## dist: a fat-LTO build of the binaries for shipping.
dist: deps
	$(CARGO) build --profile dist --workspace --bins

clean:
	$(CARGO) clean
