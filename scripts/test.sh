#!/usr/bin/env bash
# The whole test suite. Installs what the tests need when it is missing (redis-server, for the
# rate-limiting Redis policy), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is needed by the tests: install it (e.g. apt-get install redis-server)" >&2
    exit 1
  fi
fi

cargo test --workspace --locked "$@"
# The optional OpenTelemetry export of the binary: its own feature, its own test.
cargo test -p gateway --features otel --locked --test otel "$@"
