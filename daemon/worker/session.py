"""Everything the worker does with onnxruntime: build the session, describe it, warm it up, run it."""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from openinfer.client.tensors import DATATYPE_TO_NUMPY

# Telemetry must be off before onnxruntime is imported (DESIGN §4); the spawner also sets it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

# onnxruntime prints its own colored, unstructured lines; the worker reports failures itself as JSON.
ort.set_default_logger_severity(4)

ORT_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}


class UnsupportedModel(Exception):
    """The model uses a feature the wire protocol cannot carry (e.g. sequence or map outputs)."""


def build_session(model: str | bytes, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4  # fatal only: errors reach the client and our JSON log instead
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _describe(node: Any) -> dict[str, Any]:
    datatype = ORT_TO_DATATYPE.get(node.type)
    if datatype is None:
        raise UnsupportedModel(f"{node.name!r} has type {node.type}, which the protocol cannot carry")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or [])]
    return {"name": node.name, "datatype": datatype, "shape": shape}


def describe_session(session: ort.InferenceSession) -> dict[str, list[dict[str, Any]]]:
    return {
        "inputs": [_describe(n) for n in session.get_inputs()],
        "outputs": [_describe(n) for n in session.get_outputs()],
    }


def warm_up_feed(inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Zeros of every input's shape, dynamic dimensions = 1."""
    feed: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = [d if d >= 0 else 1 for d in spec["shape"]]
        if spec["datatype"] == "BYTES":
            feed[spec["name"]] = np.full(shape, "", dtype=object)
        elif spec["datatype"] == "BF16":
            raise ValueError("BF16 input: no numpy dtype to build a warm-up input with")
        else:
            feed[spec["name"]] = np.zeros(shape, dtype=DATATYPE_TO_NUMPY[spec["datatype"]])
    return feed


def warm_up(session: ort.InferenceSession, inputs: list[dict[str, Any]], timeout_s: float = 5.0) -> str | None:
    """Run once on zeros (dynamic dims = 1) so first-run allocations happen before the serve policy.

    Returns None, or why warm-up could not run (some models reject all-zero or size-1 inputs; serving
    still works, the first real request just pays the first-run cost).
    """
    try:
        feed = warm_up_feed(inputs)
    except ValueError as exc:
        return str(exc)
    # A hostile or simply huge model must not hang the boot: onnxruntime checks this flag between kernels.
    run_options = ort.RunOptions()
    timer = threading.Timer(timeout_s, lambda: setattr(run_options, "terminate", True))
    timer.start()
    try:
        session.run(None, feed, run_options)
    except Exception as exc:  # warm-up is an optimisation, never a reason to refuse the model
        return f"{type(exc).__name__}: {exc}"[:500]
    finally:
        timer.cancel()
        timer.join()
    return None


def error_code_for(exc: BaseException) -> str:
    """Map an exception from session.run to a wire error code."""
    if isinstance(exc, MemoryError):
        return "RESOURCE_EXHAUSTED"
    text = str(exc)
    if "bad_alloc" in text or "Failed to allocate" in text or "std::bad_alloc" in text:
        return "RESOURCE_EXHAUSTED"
    name = type(exc).__name__
    if name in ("InvalidArgument", "InvalidGraph") or isinstance(exc, (ValueError, TypeError)):
        return "INVALID_ARGUMENT"
    return "INTERNAL"
