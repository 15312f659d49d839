"""Regenerate examples/models/tiny/1/model.onnx: y = x @ W + b, x FP32[batch, 64] (needs `onnx`)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from onnx_builders import matmul_model  # noqa: E402

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "models" / "tiny" / "1" / "model.onnx"
    matmul_model(out)
    print(out)
