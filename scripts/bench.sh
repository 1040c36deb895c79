#!/usr/bin/env bash
# Reproduces every table of BENCHMARKS.md: builds the release binaries, runs `yidi-bench all`
# (echo baseline, CheckCard, CheckCards, h2load cross-check, 10M cards, replacement flow vs commit
# rate; reports in target/bench/), then the criterion microbenchmarks of the domain rules.
# Needs PostgreSQL (YIDI_TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/test) and,
# for the cross-check, h2load (Debian: apt-get install nghttp2-client). Extra arguments go to
# yidi-bench (e.g. --scale-cards 1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -p yidi-registry -p yidi-intake -p yidi-verification -p yidi-issuance -p yidi-bench
target/release/yidi-bench all "$@"
cargo bench -p yidi-domain --bench hot_path
