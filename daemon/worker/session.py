"""Everything the worker does with onnxruntime: build the session, describe it, warm it up, run it."""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, NamedTuple

import numpy as np

from openinfer.daemon.steps.contract import StepFailed
from openinfer.wire.errors import DeadlineExceeded, InvalidArgument
from openinfer.wire.tensors import DATATYPE_TO_NUMPY, BF16Array

from .external_data import ExternalFiles

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


def build_session(model: bytes, intra_op_threads: int, external: ExternalFiles) -> ort.InferenceSession:
    """A session from the model's bytes, its external data given from memory (worker/external_data.py):
    onnxruntime never opens a file for it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4  # fatal only: errors reach the client and our JSON log instead
    external.add_to(options)
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


_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def bf16_input(bits: np.ndarray) -> Any:
    """A BF16 input for session.run: numpy has no bfloat16, so the uint16 bits go in an OrtValue that
    says what they are."""
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(_c_order(bits, np.uint16), onnx_element_type=_BFLOAT16)


def _c_order(array: np.ndarray, dtype: Any = None) -> np.ndarray:
    """C-contiguous, same shape: not np.ascontiguousarray, which turns a scalar (shape ()) into shape (1,)."""
    return np.asarray(array, dtype=dtype, order="C")


class Runner:
    """session.run, except that BF16 outputs (which onnxruntime cannot hand over as numpy arrays) come
    back as BF16Array: such models run through run_with_ort_values and the bits are copied out."""

    raw_inputs = False  # inputs reach it converted for onnxruntime (a model with a pre step: daemon/steps/runner.py)
    last_stages: dict[str, dict[str, Any]] | None = None  # a chain's per-member times (daemon/steps/runner.py)

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.bf16_outputs = frozenset(o.name for o in session.get_outputs() if o.type == "tensor(bfloat16)")
        # Inputs whose shape the caller chooses in part: the ones a graph may refuse at run time.
        self.dynamic_inputs = frozenset(i.name for i in session.get_inputs() if any(not isinstance(d, int) or d < 0 for d in i.shape or []))
        self.no_rows = _no_rows_answer(session)

    @staticmethod
    def new_run_options() -> Any:
        return ort.RunOptions()

    def run(self, wanted: list[str], feed: dict[str, Any], run_options: Any = None) -> list[Any]:
        for name in self.dynamic_inputs:
            value = feed.get(name)
            if getattr(value, "size", 1) == 0:
                return self._no_rows(wanted, feed, name, value)
        if not self.bf16_outputs.intersection(wanted):
            return self.session.run(wanted, feed, run_options)  # type: ignore[no-any-return]
        values = {}
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                if value.dtype == object:
                    raise ValueError("a model with BF16 outputs cannot take BYTES inputs here (onnxruntime cannot wrap strings for that call)")
                value = ort.OrtValue.ortvalue_from_numpy(_c_order(value))
            values[name] = value
        results = self.session.run_with_ort_values(wanted, values, run_options)
        return [_bf16_bits(value) if value.data_type() == "tensor(bfloat16)" else value.numpy() for value in results]

    def _no_rows(self, wanted: list[str], feed: dict[str, Any], name: str, value: Any) -> list[Any]:
        """Attacker round 79: onnxruntime aborts the whole process on some models given a tensor of no
        elements (silero_vad with a state of [2, 0, 128]: SIGABRT inside its kernels), so none reaches it
        in a dimension the caller chooses. A request of no rows for a model of rows - every input and
        output [rows, fixed...] - has its answer without a run: no rows of each output (PROTOCOL.md 8.3,
        the conformance vector tiny_batch_0). Any other is the caller's mistake."""
        answer = self.no_rows
        if answer is not None and all(getattr(feed.get(input_name), "shape", (1,))[:1] == (0,) for input_name in answer.inputs):
            return [answer.outputs[output].copy() for output in wanted]
        shape = list(getattr(value, "shape", ()))
        raise InvalidArgument(f"input {name!r} {shape} holds no elements: onnxruntime is not given tensors of no elements (some models' kernels abort the process on them); send at least one")


class NoRowsAnswer(NamedTuple):
    inputs: frozenset[str]  # every input's name
    outputs: dict[str, Any]  # the empty array of each output, by name


def _no_rows_answer(session: ort.InferenceSession) -> NoRowsAnswer | None:
    """The answer to no rows of a model whose every input and output is [rows, fixed dimensions...]; else None."""
    def rows_of_fixed(shape: Any) -> bool:
        return bool(shape) and not (isinstance(shape[0], int) and shape[0] >= 0) and all(isinstance(d, int) and d >= 0 for d in shape[1:])

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if not all(rows_of_fixed(arg.shape) for arg in [*inputs, *outputs]):
        return None
    empty: dict[str, Any] = {}
    for output in outputs:
        datatype = ORT_TO_DATATYPE.get(output.type)
        if datatype is None or datatype == "BF16":
            return None
        empty[output.name] = np.zeros((0, *output.shape[1:]), DATATYPE_TO_NUMPY[datatype])
    return NoRowsAnswer(frozenset(arg.name for arg in inputs), empty)


def _bf16_bits(value: Any) -> BF16Array:
    shape = value.shape()
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return BF16Array(np.zeros(shape, dtype=np.uint16))
    raw = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    return BF16Array(np.ctypeslib.as_array(raw).copy().reshape(shape))


def warm_up_feed(inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Zeros of every input's shape, dynamic dimensions = 1."""
    feed: dict[str, Any] = {}
    for spec in inputs:
        shape = [d if d >= 0 else 1 for d in spec["shape"]]
        if spec["datatype"] == "BYTES":
            feed[spec["name"]] = np.full(shape, "", dtype=object)
        elif spec["datatype"] == "BF16":
            feed[spec["name"]] = bf16_input(np.zeros(shape, dtype=np.uint16))
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
        Runner(session).run([o.name for o in session.get_outputs()], feed, run_options)
    except Exception as exc:  # warm-up is an optimisation, never a reason to refuse the model
        return f"{type(exc).__name__}: {exc}"[:500]
    finally:
        timer.cancel()
        timer.join()
    return None


# A kernel that meets a shape the graph cannot take fails with onnxruntime's generic status FAIL (or
# RUNTIME_EXCEPTION), the same status as a genuine fault, so the status alone cannot tell them apart.
# Its message can: a node failure ("Non-zero status code returned while running <Op> node ...") whose
# kernel complains about shapes, in the words onnxruntime 1.31-1.32's CPU kernels use (seen for ocr_det
# with H = 48, silero_vad with mismatched batch sizes, MatMul, Concat, Reshape, Split, Pad, TopK, Conv).
# Anything else stays INTERNAL: only a complaint named here is taken for the caller's mistake.
_NODE_FAILURE = "Non-zero status code returned while running "
_SHAPE_COMPLAINTS = (
    "attempting to broadcast",  # element-wise ops: "... broadcast an axis by a dimension other than 1. 3 by 4"
    "dimension mismatch",  # MatMul
    "mismatched dimensions",  # Concat: "Axis 1 has mismatched dimensions of 4 and 3"
    "cannot be reshaped",  # Reshape
    "must have shape",  # LSTM/GRU/RNN states: "Input initial_h must have shape {1,2,128}. Actual:{1,1,128}"
    "input shape",  # Pad, Split: "... Input shape:{1,0}", "... Input shape={5}"
    "kernel channels",  # Conv: "Input channels C is not equal to kernel channels * group"
    "axis dim",  # TopK: "k argument [4] should not be greater than specified axis dim value [2]"
)
_ORT_CALLER_STATUS = {"InvalidArgument", "InvalidGraph"}  # onnxruntime itself blames the input
_ORT_GENERIC_STATUS = {"Fail", "RuntimeException"}  # blames nobody: read the message


def error_code_for(exc: BaseException) -> str:
    """Map an exception from session.run to a wire error code."""
    if isinstance(exc, MemoryError):
        return "RESOURCE_EXHAUSTED"
    text = str(exc)
    if "bad_alloc" in text or "Failed to allocate" in text or "std::bad_alloc" in text:
        return "RESOURCE_EXHAUSTED"
    name = type(exc).__name__
    if name in _ORT_CALLER_STATUS or isinstance(exc, (ValueError, TypeError)):
        return "INVALID_ARGUMENT"
    if name in _ORT_GENERIC_STATUS and _is_shape_complaint(text):
        return "INVALID_ARGUMENT"
    return "INTERNAL"


def _is_shape_complaint(text: str) -> bool:
    if _NODE_FAILURE not in text:
        return False
    complaint = text.rpartition("Status Message:")[2].lower()  # the innermost node's (If/Loop nest them)
    return any(phrase in complaint for phrase in _SHAPE_COMPLAINTS)


def task_error(exc: BaseException, inputs: list[dict[str, Any]], dynamic_inputs: frozenset[str]) -> dict[str, str]:
    """The wire error {code, message} for a task whose run raised `exc`; `inputs` are the request's
    specs (name, shape). When a node of the graph refused the inputs, the message says which inputs
    (those with a dynamic dimension: the others have the metadata's shape, already checked) and their
    shapes, then what onnxruntime said, so the caller can see what to change."""
    if isinstance(exc, StepFailed):  # already says which step and whose mistake
        return {"code": exc.code, "message": str(exc)[:2000]}
    if isinstance(exc, (DeadlineExceeded, InvalidArgument)):  # the run watch stopped it (worker/channel_tasks.py); an empty input
        return {"code": exc.code, "message": exc.message[:2000]}
    code = error_code_for(exc)
    message = f"{type(exc).__name__}: {str(exc).strip()}"
    if code == "INVALID_ARGUMENT" and _NODE_FAILURE in message and inputs:
        named = [spec for spec in inputs if spec.get("name") in dynamic_inputs] or inputs
        shapes = " and ".join(f"{spec.get('name')!r} {list(spec.get('shape') or [])}" for spec in named)
        if len(named) == 1:
            message = f"input {shapes}: the model's graph cannot take this shape; onnxruntime said: {message}"
        else:
            message = f"inputs {shapes}: the model's graph cannot take these shapes together; onnxruntime said: {message}"
    return {"code": code, "message": message[:2000]}
