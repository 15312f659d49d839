#!/usr/bin/env bash
# Shared by the quick start, the test run and the benchmarks (`bash examples/bootstrap.sh bench`): make
# .venv (installing Debian's python3-venv if a fresh machine lacks it) and install this checkout into it
# with the given extras.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "python3-venv is missing: sudo apt-get install python3-venv" >&2; exit 1
  fi
fi
if [[ ",$extras," == *",bench,"* ]] && [ "$(id -u)" = 0 ] && { ! command -v make >/dev/null || ! command -v wrk >/dev/null || ! pkg-config --exists libzmq 2>/dev/null || ! { pkg-config --exists msgpack 2>/dev/null || pkg-config --exists msgpack-c 2>/dev/null; }; }; then
  # bench/cwire (the C load generator of bench/batching.py and bench/peers.py) builds with libzmq and
  # msgpack-c, as client/c does; wrk is the C HTTP generator bench/peers.py drives FastAPI+uvicorn with.
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make gcc pkg-config libzmq3-dev libmsgpack-dev wrk >/dev/null
elif [[ ",$extras," == *",bench,"* ]] && ! command -v wrk >/dev/null; then
  echo "wrk is missing (bench/peers.py's HTTP generator): sudo apt-get install wrk" >&2
fi
if [[ ",$extras," == *",ocr,"* || ",$extras," == *",test,"* ]] && ! ldconfig -p 2>/dev/null | grep -q 'libGL\.so\.1'; then
  # OpenCV (the OCR chain's image processing, from rapidocr_onnxruntime) loads libGL and glib at import.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgl1 libglib2.0-0 >/dev/null
  else
    echo "libGL is missing (OpenCV, for the OCR chain): sudo apt-get install libgl1 libglib2.0-0" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
