#!/usr/bin/env bash
# Runs every test: unit tests, in-process service tests, and the integration suite that starts the
# real binaries as separate processes, once on SQLite and once on PostgreSQL.
#
# PostgreSQL: YIDI_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test). If it is
# unreachable, the PostgreSQL runs are skipped (and said to be), unless YIDI_REQUIRE_POSTGRES=1.
set -euo pipefail
cd "$(dirname "$0")/.."

url="${YIDI_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
hostport="${url#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$hostport" ] && port=5432
if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
  echo "PostgreSQL reachable at $host:$port: integration tests run on SQLite and on PostgreSQL."
  postgres=up
else
  postgres=down
  if [ "${YIDI_REQUIRE_POSTGRES:-0}" = 1 ]; then
    echo "PostgreSQL is required (YIDI_REQUIRE_POSTGRES=1) but $host:$port is unreachable." >&2
    exit 1
  fi
  echo "PostgreSQL unreachable at $host:$port: the PostgreSQL runs will be SKIPPED (SQLite runs only)."
fi

# The integration tests start the service binaries, so build them first (same debug profile).
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
[ "$postgres" = down ] && echo "NOTE: PostgreSQL runs were skipped (no server at $host:$port)."
exit 0
