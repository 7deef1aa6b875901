#!/usr/bin/env bash
# Runs every check and test of CNNF against real parts: a real nats-server
# (each test starts its own on a free port with a temporary store), real
# RocksDB, and (for the agent) real network namespaces and iptables, which
# need root. Installs what a fresh machine lacks first.
#
#   scripts/test.sh            format, lints, then all tests
#   scripts/test.sh -E 'test(foo)'   extra arguments go to cargo nextest
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ensure_all
cd "$CNNF_ROOT"
# The packages above make a real dockerd available: its test must run, not skip.
export CNNF_REQUIRE_DOCKER=${CNNF_REQUIRE_DOCKER:-1}

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy (release profile, shares the test build)"
cargo clippy --release --workspace --all-targets --locked -- -D warnings
bash scripts/check-deploy.sh
# deploy/compose on a real Docker Engine: learn, prevent, attack, audit.
bash scripts/compose-e2e.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
say "tests (nats-server: $("$CNNF_NATS_SERVER" --version))"
cargo nextest run --release --workspace --locked --no-fail-fast "$@"
