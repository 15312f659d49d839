#!/usr/bin/env bash
# The test command: install everything from this repo's files, then run the whole suite with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && { ! command -v systemd-analyze >/dev/null || ! command -v make >/dev/null || ! command -v espeak-ng >/dev/null || ! pkg-config --exists libzmq 2>/dev/null || ! { pkg-config --exists msgpack 2>/dev/null || pkg-config --exists msgpack-c 2>/dev/null; }; }; then
  # systemd-analyze verifies the hardened unit; strace is used by the sandbox syscall tests;
  # libzmq3-dev + libmsgpack-dev (+ make, gcc, pkg-config) build the C client in client/c/;
  # espeak-ng speaks the sentences the silero_vad steps are checked on (tests/test_steps_silero.py).
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd strace make gcc pkg-config libzmq3-dev libmsgpack-dev espeak-ng >/dev/null
fi
# The bench extra too: tests/test_bench_peers.py runs bench/peers.py against FastAPI+uvicorn, driven by aiohttp
# and wrk (bootstrap.sh installs wrk from Debian as root), and the plotting checks draw with matplotlib.
bash examples/bootstrap.sh test,bench
# Two test processes (pytest-xdist), each taking whole files: a file's daemons and module fixtures stay in
# one process. `-n 0` (after, in "$@") runs it in this one.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
