"""How a failed model run is reported (daemon/worker/session.py), against onnxruntime in process: each
shape complaint the worker takes for the caller's mistake is a message onnxruntime really gives, and a
genuine fault, inside a node or not, stays INTERNAL."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_builders
from openinfer.daemon.worker.session import error_code_for, task_error

pytestmark = pytest.mark.unit

F = TensorProto.FLOAT
V = helper.make_tensor_value_info


def session_of(nodes: list[Any], inputs: list[Any], initializers: tuple[np.ndarray, ...] = (), names: tuple[str, ...] = ()) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, [V("out", F, None)], initializer=[numpy_helper.from_array(a, n) for a, n in zip(initializers, names)])
    model = helper.make_model(graph, opset_imports=onnx_builders.OPSET)
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def failure(session: ort.InferenceSession, feed: dict[str, np.ndarray], run_options: Any = None) -> Exception:
    with pytest.raises(Exception) as info:
        session.run(None, feed, run_options)
    return info.value  # type: ignore[return-value]


F32 = np.float32
SHAPE_FAILURES = {
    "broadcast": (lambda: session_of([helper.make_node("Add", ["a", "b"], ["out"])], [V("a", F, ["n"]), V("b", F, ["m"])]),
                  {"a": np.zeros(2, F32), "b": np.zeros(3, F32)}),
    "matmul": (lambda: session_of([helper.make_node("MatMul", ["a", "b"], ["out"])], [V("a", F, ["n", "k"]), V("b", F, ["j", "m"])]),
               {"a": np.zeros((2, 3), F32), "b": np.zeros((4, 5), F32)}),
    "concat": (lambda: session_of([helper.make_node("Concat", ["a", "b"], ["out"], axis=0)], [V("a", F, ["n", "k"]), V("b", F, ["m", "j"])]),
               {"a": np.zeros((2, 3), F32), "b": np.zeros((2, 4), F32)}),
    "reshape": (lambda: session_of([helper.make_node("Reshape", ["a", "shape"], ["out"])], [V("a", F, ["n"])], (np.array([3, -1], np.int64),), ("shape",)),
                {"a": np.zeros(4, F32)}),
    "split": (lambda: session_of([helper.make_node("Split", ["a", "sizes"], ["out", "rest"], axis=0)], [V("a", F, ["n"])], (np.array([2, 2], np.int64),), ("sizes",)),
              {"a": np.zeros(5, F32)}),
    "topk": (lambda: session_of([helper.make_node("TopK", ["a", "k"], ["out", "index"])], [V("a", F, ["n"])], (np.array([4], np.int64),), ("k",)),
             {"a": np.zeros(2, F32)}),
    "conv channels": (lambda: session_of([helper.make_node("Conv", ["a", "w"], ["out"])], [V("a", F, ["n", "c", "h", "w"])], (np.zeros((1, 3, 3, 3), F32),), ("w",)),
                      {"a": np.zeros((1, 4, 5, 5), F32)}),
}


@pytest.mark.parametrize("case", sorted(SHAPE_FAILURES))
def test_a_kernels_shape_complaint_is_the_callers_mistake(case: str) -> None:
    build, feed = SHAPE_FAILURES[case]
    exc = failure(build(), feed)
    assert type(exc).__name__ == "Fail"  # onnxruntime's generic status: the message decides
    assert error_code_for(exc) == "INVALID_ARGUMENT", str(exc)


def test_the_message_names_the_dynamic_inputs_and_quotes_onnxruntime() -> None:
    build, feed = SHAPE_FAILURES["matmul"]
    exc = failure(build(), feed)
    inputs = [{"name": "a", "shape": [2, 3]}, {"name": "b", "shape": [4, 5]}, {"name": "fixed", "shape": [1]}]
    error = task_error(exc, inputs, frozenset({"a", "b"}))
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["message"] == f"inputs 'a' [2, 3] and 'b' [4, 5]: the model's graph cannot take these shapes together; onnxruntime said: Fail: {str(exc).strip()}"
    alone = task_error(exc, inputs, frozenset({"a"}))["message"]
    assert alone.startswith("input 'a' [2, 3]: the model's graph cannot take this shape; onnxruntime said: Fail: ")


def test_a_fault_inside_a_node_stays_internal(tmp_path: Path) -> None:
    """The endless Loop stopped by the run's terminate flag: a node failure, but not about shapes."""
    session = ort.InferenceSession(str(onnx_builders.endless_loop_model(tmp_path / "spin.onnx")), providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    stopper = threading.Timer(0.1, lambda: setattr(run_options, "terminate", True))
    stopper.start()
    try:
        exc = failure(session, {"x": np.zeros(1, F32)}, run_options)
    finally:
        stopper.join()
    assert "running Loop node" in str(exc) and "terminate" in str(exc)
    assert error_code_for(exc) == "INTERNAL"
    assert task_error(exc, [{"name": "x", "shape": [1]}], frozenset())["message"] == f"Fail: {str(exc).strip()}"


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("outputs"),  # a bug of ours
        RuntimeError("Non-zero status code returned while running Add node. Status Message: broadcast"),  # not onnxruntime's
        ort.capi.onnxruntime_pybind11_state.Fail("Non-zero status code returned while running Foo node. Name:'' Status Message: cannot open file"),
        ort.capi.onnxruntime_pybind11_state.Fail("could not broadcast: but not while running a node"),
        ort.capi.onnxruntime_pybind11_state.RuntimeException("Non-zero status code returned while running Foo node. Status Message: unknown exception"),
    ],
    ids=repr,
)
def test_other_failures_stay_internal(exc: Exception) -> None:
    assert error_code_for(exc) == "INTERNAL"


def test_running_out_of_memory_is_resource_exhausted() -> None:
    session = session_of([helper.make_node("ConstantOfShape", ["shape"], ["out"])], [V("shape", TensorProto.INT64, ["n"])])
    exc = failure(session, {"shape": np.array([1 << 40, 1 << 20], np.int64)})  # refused before any page is touched
    assert error_code_for(exc) == "RESOURCE_EXHAUSTED", str(exc)
