#!/usr/bin/env bash
# Quick start: install, serve the shipped example models, ask them something, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/bootstrap.sh ocr  # the OCR chain's image libraries (rapidocr_onnxruntime)
exec .venv/bin/python examples/quickstart.py
