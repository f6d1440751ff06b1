#!/usr/bin/env bash
# Installs what the tests need (PostgreSQL server, headless Chromium) and runs the whole test suite.
# The suite runs in the release profile: it then reuses the dependencies that `cargo run --release -p rlhf -- demo`
# compiled (one build instead of two), and the numerical tests run at full speed.
# Suites that cannot run here (no PostgreSQL, no browser) leave a marker under target/tmp/skipped/; they are
# listed at the end, after cargo's own summary. With CI set they fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .ci/feedback-setup.sh ]; then
  # The setup script prints `export VAR=...` lines for the services it started.
  eval "$(bash .ci/feedback-setup.sh)"
fi
skipped="${CARGO_TARGET_DIR:-target}/tmp/skipped"
rm -rf "$skipped"
status=0
cargo test --workspace --locked --release "$@" || status=$?
if [ -d "$skipped" ] && [ -n "$(ls -A "$skipped")" ]; then
  echo
  echo "SKIPPED $(ls "$skipped" | wc -l) test suite(s) — these did NOT run:"
  for f in "$skipped"/*.txt; do
    echo "  SKIP $(basename "$f" .txt): $(cat "$f")"
  done
else
  echo "SKIPPED: none (every suite ran)"
fi
exit "$status"
