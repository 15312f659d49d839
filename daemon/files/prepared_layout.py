"""What a prepared directory `<cache>/<key>/` holds - shared by the prepare helper that writes it, the
supervisor that checks it before taking it into the cache, and the workers that load it."""
from __future__ import annotations

OPT_MODEL = "model.opt.onnx"  # the optimized model; its one external file is WEIGHTS
WEIGHTS = "weights.bin"  # pre-packed initializers, mapped read-only by every worker
CHECK = "check.msgpack"  # a known input and its output, verified by every worker at start
MANIFEST = "manifest.json"  # what the directory was made from (see prepare.py)
FILES = frozenset({OPT_MODEL, WEIGHTS, CHECK, MANIFEST})  # exactly these, nothing else
MANIFEST_MAX_BYTES = 64 * 1024
REPORT = {"result": "prepared"}  # the helper's one line on its status pipe when it succeeded


def output_limit_bytes(source_bytes: int) -> int:
    """Largest file the helper may write, and the supervisor accepts (the helper's RLIMIT_FSIZE): the
    pre-packed weights and the optimized model are each about the size of the source."""
    return 4 * source_bytes + (64 << 20)
