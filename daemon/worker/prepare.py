"""Preparing shared weights, run once per model version in a sandboxed helper process.

onnxruntime pre-packs MatMul/Gemm weights into its private heap at session creation, so N workers loading
one model hold N copies. Instead the helper saves, once, an optimized model whose single external file
(`weights.bin`) already holds the pre-packed weights; workers then load it with graph optimisations off and
onnxruntime maps that file read-only: every worker shares the same page-cache pages, at full speed
(DESIGN §5). The packed layout depends on the CPU and the onnxruntime version, so both are part of the
cache key, and a known input's output (`check.msgpack`) is verified by every worker at start.

The layout is in daemon/files/prepared_layout.py. The helper writes into the private temporary directory it is
given and reports only that it succeeded: the supervisor computed the key before starting it
(daemon/files/cache_key.py), checks what the helper wrote, and renames it into `<cache>/<key>` itself. The helper
parses the untrusted model, so nothing it says is taken as a path or a key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from openinfer.wire.protocol import pack, unpack
from openinfer.wire.tensors import decode_array, encode_array
from openinfer.daemon.files.cache_key import cpu_fingerprint, onnxruntime_version
from openinfer.daemon.files.prepared_layout import CHECK, MANIFEST, OPT_MODEL, WEIGHTS

from .external_data import ExternalFiles
from .session import ort, warm_up_feed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _session_options(intra_op_threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    return options


def prepare(model: bytes, external: ExternalFiles, out_dir: Path, intra_op_threads: int, source: str) -> dict[str, Any]:
    """Write a prepared directory for the model `source` (its bytes and mapped external data, as the workers
    load it: worker/model_source.py) into the (empty, writable) `out_dir`; returns the manifest."""
    options = _session_options(intra_op_threads)
    options.optimized_model_filepath = str(out_dir / OPT_MODEL)
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    external.add_to(options)
    reference = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    weights = out_dir / WEIGHTS
    if not weights.exists() or weights.stat().st_size == 0:  # (onnxruntime's removal of an empty one is refused)
        raise ValueError("the model has no initializers large enough to share")
    feed = warm_up_feed([{"name": i.name, "datatype": _datatype(i.type), "shape": _shape(i.shape)} for i in reference.get_inputs()])
    expected = reference.run(None, feed)
    # The prepared model must give the same numbers as the source before anyone serves from it.
    prepared = load_prepared(out_dir, intra_op_threads)
    got = prepared.run(None, feed)
    for want, have in zip(expected, got):
        if not np.allclose(np.asarray(want), np.asarray(have), rtol=1e-4, atol=1e-5, equal_nan=True):
            raise ValueError("the prepared model's output differs from the source model's")
    (out_dir / CHECK).write_bytes(_pack_arrays({"inputs": feed, "outputs": {str(i): np.asarray(v) for i, v in enumerate(expected)}}))
    manifest = {
        "source": source,
        "source_sha256": hashlib.sha256(model).hexdigest(),
        "onnxruntime": onnxruntime_version(),
        "cpu": cpu_fingerprint(),
        "weights_bytes": (out_dir / WEIGHTS).stat().st_size,
        "weights_sha256": file_sha256(out_dir / WEIGHTS),
        "model_sha256": file_sha256(out_dir / OPT_MODEL),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_prepared(directory: Path, intra_op_threads: int) -> Any:
    options = _session_options(intra_op_threads)
    # Optimising again would re-pack the weights into private memory: the prepared file is already packed.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(directory / OPT_MODEL), sess_options=options, providers=["CPUExecutionProvider"])


def verify_prepared(session: Any, directory: Path) -> None:
    """Run the recorded input and compare with the recorded output; raise ValueError on any difference."""
    check = _unpack_arrays((directory / CHECK).read_bytes())
    feed = check["inputs"]
    expected = [check["outputs"][str(i)] for i in range(len(check["outputs"]))]
    got = session.run(None, feed)
    for want, have in zip(expected, got):
        if not np.allclose(want, np.asarray(have), rtol=1e-4, atol=1e-5, equal_nan=True):
            raise ValueError(f"prepared artefact mismatch in {directory}: a known input gave different outputs")


def _pack_arrays(groups: dict[str, dict[str, np.ndarray]]) -> bytes:
    """Arrays in the wire protocol's own tensor encoding: no pickle, no zip (whose codecs would need imports
    the sandbox no longer allows)."""
    out: dict[str, Any] = {}
    for group, arrays in groups.items():
        out[group] = {}
        for name, array in arrays.items():
            datatype, shape, payload = encode_array(array)
            out[group][name] = {"datatype": datatype, "shape": shape, "data": bytes(payload)}
    return pack(out)


def _unpack_arrays(raw: bytes) -> dict[str, dict[str, np.ndarray]]:
    groups = unpack(raw)
    return {g: {n: decode_array(t["datatype"], t["shape"], t["data"]) for n, t in arrays.items()} for g, arrays in groups.items()}


def _datatype(ort_type: str) -> str:
    from .session import ORT_TO_DATATYPE

    return ORT_TO_DATATYPE.get(ort_type, "FP32")


def _shape(shape: Any) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in (shape or [])]
