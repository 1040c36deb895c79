#!/usr/bin/env bash
# Builds the workspace and starts the whole suite on loopback, in the foreground (Ctrl-C stops it).
# Arguments go to yidi-demo (see `scripts/demo.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/yidi-demo" "$@"
