#!/usr/bin/env bash
# Runs Tandem's whole test suite on a fresh machine: installs and starts what
# the tests need, builds once, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-targets
else
    cargo test --workspace --all-targets
fi
