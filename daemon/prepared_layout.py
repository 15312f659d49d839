"""What a prepared directory `<cache>/<key>/` holds - shared by the prepare helper that writes it and the
workers that load it."""
from __future__ import annotations

OPT_MODEL = "model.opt.onnx"  # the optimized model; its one external file is WEIGHTS
WEIGHTS = "weights.bin"  # pre-packed initializers, mapped read-only by every worker
CHECK = "check.msgpack"  # a known input and its output, verified by every worker at start
MANIFEST = "manifest.json"  # what the directory was made from (see prepare.py)
