#!/usr/bin/env bash
# Installs what the tests need (PostgreSQL server, headless Chromium) and runs the whole test suite.
# The suite runs in the release profile: it then reuses the dependencies that `cargo run --release -p rlhf -- demo`
# compiled (one build instead of two), and the numerical tests run at full speed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .ci/feedback-setup.sh ]; then
  # The setup script prints `export VAR=...` lines for the services it started.
  eval "$(bash .ci/feedback-setup.sh)"
fi
cargo test --workspace --locked --release "$@"
