#!/usr/bin/env bash
# The test command: install everything from this repo's files, then run the whole suite with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && ! command -v systemd-analyze >/dev/null; then
  # systemd-analyze verifies the hardened unit; strace is used by the sandbox syscall tests.
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd strace >/dev/null
fi
bash examples/bootstrap.sh test
exec .venv/bin/python -m pytest "$@"
