"""Small ONNX models built with onnx.helper for the tests (and hostile ones for the sandbox tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def matmul_model(path: Path, size: int = 64, seed: int = 0, batch: str | int = "batch") -> Path:
    """y = x @ W + b with x: FP32[batch, size]; the canonical 'tiny model'."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal((size,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, size])],
        initializer=[weight, bias],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def multi_io_model(path: Path) -> Path:
    """Two inputs of different dtypes (FP32 matrix, INT32 vector), two outputs, a string output too."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["x"], ["row_sum"], keepdims=0, axes=None) if False else helper.make_node("ReduceSum", ["x", "axis"], ["row_sum"], keepdims=0),
            helper.make_node("Add", ["row_sum", "ids_f"], ["sum_plus_ids"]),
            helper.make_node("Mul", ["ids", "two"], ["ids_doubled"]),
        ],
        "multi_io",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT32, ["n"]),
        ],
        [
            helper.make_tensor_value_info("sum_plus_ids", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("ids_doubled", TensorProto.INT32, ["n"]),
        ],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"), numpy_helper.from_array(np.array(2, dtype=np.int32), "two")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def string_model(path: Path) -> Path:
    """BYTES in, BYTES out (Identity on a string tensor) plus its length as INT64."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"]), helper.make_node("Shape", ["text"], ["count"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["n"]), helper.make_tensor_value_info("count", TensorProto.INT64, [1])],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def string_fanout_model(path: Path) -> Path:
    """n INT64[1] in, n strings out (a constant Expanded): a tiny request whose reply holds as many BYTES
    elements as it asks for."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["one", "n"], ["out"])],
        "string_fanout",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.STRING, ["m"])],
        initializer=[numpy_helper.from_array(np.array([b"x"], dtype=object), "one")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def string_grid_model(path: Path) -> Path:
    """BYTES [rows, width] in, the same out: batchable, and each row holds as many elements as it likes."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "string_grid",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["rows", "width"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["rows", "width"])],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def string_rows_model(path: Path) -> Path:
    """BYTES rows in, the same rows out plus a numeric copy of a second input: every output has a batch
    dimension (string_model's `count` does not), so the model can batch."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"]), helper.make_node("Identity", ["n"], ["n_out"])],
        "string_rows",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["rows"]), helper.make_tensor_value_info("n", TensorProto.INT64, ["rows", 2])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["rows"]), helper.make_tensor_value_info("n_out", TensorProto.INT64, ["rows", 2])],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def bf16_model(path: Path) -> Path:
    """x BF16[n, 4] -> y = x (BF16), f = float32(x), d = bfloat16(2 * float32(x)): bfloat16 both ways."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["y"]),
            helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["f", "two"], ["f2"]),
            helper.make_node("Cast", ["f2"], ["d"], to=TensorProto.BFLOAT16),
        ],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 4]),
            helper.make_tensor_value_info("f", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("d", TensorProto.BFLOAT16, ["n", 4]),
        ],
        initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def bf16_scalar_model(path: Path) -> Path:
    """s BF16[] (a scalar) -> y = s (BF16[]), f = float32(s) (FP32[]), h = bfloat16(f / 2) (BF16[]):
    rank-0 tensors in and out beside BF16 ones."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["s"], ["y"]),
            helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["f", "two"], ["half"]),
            helper.make_node("Cast", ["half"], ["h"], to=TensorProto.BFLOAT16),
        ],
        "bf16_scalar",
        [helper.make_tensor_value_info("s", TensorProto.BFLOAT16, [])],
        [
            helper.make_tensor_value_info("y", TensorProto.BFLOAT16, []),
            helper.make_tensor_value_info("f", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("h", TensorProto.BFLOAT16, []),
        ],
        initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def cast_model(source: int, target: int, shape: list[Any] | None = None) -> bytes:
    """x of TensorProto type `source` and `shape` (default [n, 4]) -> y cast to `target`, serialized:
    onnxruntime's own conversions (float32 <-> bfloat16) as the reference the BF16 tests compare with."""
    shape = ["n", 4] if shape is None else shape
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=target)], "cast",
                              [helper.make_tensor_value_info("x", source, shape)], [helper.make_tensor_value_info("y", target, shape)])
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = min(model.ir_version, 10)  # as _save does
    return model.SerializeToString()


def scalar_model(path: Path) -> Path:
    """Scalar INT64 input `k` and FP32 vector `x`: y = x * k."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "kf"], ["y"])],
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("k", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def memory_bomb_model(path: Path, elements: int = 10 * 1024**3 // 4) -> Path:
    """ConstantOfShape asking for `elements` floats (~10 GB by default) when run."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["scale", "x"], ["dims"]),
            helper.make_node("ConstantOfShape", ["dims"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "bomb",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array([elements], dtype=np.int64), "scale")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def _counting_loop_body(shape: list[Any] | None = None) -> onnx.GraphProto:
    """Loop body: keep going, add 1 to the carried FP32 value (of `shape`, default [1]) on every iteration."""
    shape = shape or [1]
    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one")],
    )


def endless_loop_model(path: Path, iterations: int = 10**12) -> Path:
    """A Loop that runs `iterations` times (forever, in practice) adding 1 to a counter."""
    body = _counting_loop_body()
    graph = helper.make_graph(
        [helper.make_node("Loop", ["max_iter", "cond", "x"], ["y"], body=body)],
        "spin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array(iterations, dtype=np.int64), "max_iter"), numpy_helper.from_array(np.array(True), "cond")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def spin_on_demand_model(path: Path) -> Path:
    """Like endless_loop_model for x = 1 (10^12 iterations: forever, in practice) but instant for x = 0, so
    the worker's warm-up on zeros does not spin out its 5 s bound on every start (tests that need the
    boot-time warm-up of a hostile model use endless_loop_model)."""
    body = _counting_loop_body()
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["scaled"]),
            helper.make_node("ReduceMax", ["scaled"], ["most"], keepdims=0),
            helper.make_node("Cast", ["most"], ["max_iter"], to=TensorProto.INT64),
            helper.make_node("Loop", ["max_iter", "cond", "x"], ["y"], body=body),
        ],
        "spin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array([1e12], dtype=np.float32), "scale"), numpy_helper.from_array(np.array(True), "cond")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def conv_image_model(path: Path) -> Path:
    """Dynamic 4-D image input FP32[N,3,H,W] -> 3x3 conv to 4 channels."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["features"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        initializer=[weight],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def large_matmul_model(path: Path, size: int = 4096, layers: int = 2, seed: int = 5) -> Path:
    """A chain of `layers` MatMuls with size x size FP32 weights (64 MiB each at 4096): for weight sharing."""
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    prev = "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((size, size)) * (1.0 / size**0.5)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", size])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))  # no checker: it would copy the whole model once more
    return path


def busy_loop_model(path: Path) -> Path:
    """y = x + n, computed by a Loop of `n` iterations (INT64 scalar input): compute time set by the caller."""
    body = _counting_loop_body()
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body)],
        "busy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array(True), "cond")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def row_loop_model(path: Path) -> Path:
    """x FP32[batch, 1] -> y = x + max(x), computed by a Loop of max(x) iterations: batchable, and one
    request with a huge value makes the whole batch it rides in spin (for batch isolation tests)."""
    body = _counting_loop_body(["batch", 1])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
            helper.make_node("Cast", ["top"], ["n"], to=TensorProto.INT64),
            helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body),
        ],
        "rowloop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(np.array(True), "cond")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def external_weights_model(path: Path, location: str = "weights.bin", size: int = 16, seed: int = 7) -> tuple[Path, np.ndarray]:
    """y = x + W with W: FP32[size] kept in an external-data file `location` beside the model (a legitimate
    external-data model). Returns the model path and W."""
    weight = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    tensor = numpy_helper.from_array(weight, "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "external_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
        initializer=[tensor],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 10
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path, weight


def external_reference(name: str, location: str, count: int) -> onnx.TensorProto:
    """An INT32[count] initializer whose bytes are read from `location` (offset 0): nothing is written."""
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.INT32, dims=[count], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * count))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def leaking_model(path: Path, location: str, count: int = 16, nested: bool = False) -> Path:
    """y = x + W, W: INT32[count] read from whatever file `location` names, so a zero input returns that
    file's first 4 x count bytes to the client. `nested`: W lives in an If branch's initializer, where only a
    walker that descends into subgraphs finds it."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.INT32, [count])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.INT32, [count])]
    if not nested:
        graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "leak", inputs, outputs, initializer=[external_reference("W", location, count)])
    else:
        branch = helper.make_graph([helper.make_node("Identity", ["W"], ["w_out"])], "branch", [],
                                   [helper.make_tensor_value_info("w_out", TensorProto.INT32, [count])], initializer=[external_reference("W", location, count)])
        graph = helper.make_graph(
            [helper.make_node("If", ["always"], ["w"], then_branch=branch, else_branch=branch), helper.make_node("Add", ["x", "w"], ["y"])],
            "leak_nested", inputs, outputs, initializer=[numpy_helper.from_array(np.array(True), "always")],
        )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())  # no checker: it would look for the file
    return path


def two_free_rows_model(path: Path) -> Path:
    """ox = -x, oy = -y: two inputs whose dimension 0 are unrelated (and dynamic, so the model batches)."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["ox"]), helper.make_node("Neg", ["y"], ["oy"])],
        "two_free_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", 4]), helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("ox", TensorProto.FLOAT, ["a", 4]), helper.make_tensor_value_info("oy", TensorProto.FLOAT, ["b", 4])],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def broadcast_add_model(path: Path) -> Path:
    """out = x + y, both inputs and the output declared [n, 4] with ONE symbolic n (the usual way to write
    "same batch"; onnxruntime does not check that the two n agree, and broadcasts a 1)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["out"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]), helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def box_overlap_model(path: Path) -> Path:
    """y = boxes + 0 * (how many NonMaxSuppression keeps), boxes FP32[batch, S, 4], batchable on axis 0.
    One kernel whose time the data sets: O(S^2) when the boxes do not overlap (`disjoint_boxes`), O(S)
    when they are all one box - and onnxruntime's stop flag is not checked inside it (a run that cannot
    be stopped while that kernel runs)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["top"], axes=[2], keepdims=0),
            helper.make_node("Unsqueeze", ["top", "one"], ["scores"]),
            helper.make_node("NonMaxSuppression", ["x", "scores", "keep_all", "iou"], ["kept"]),
            helper.make_node("ReduceSum", ["kept"], ["count"], keepdims=0),
            helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["count_f", "zero"], ["nothing"]),
            helper.make_node("Add", ["x", "nothing"], ["y"]),
        ],
        "box_overlap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "S", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "S", 4])],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([10**9], np.int64), "keep_all"),
            numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def disjoint_boxes(count: int) -> np.ndarray:
    """[1, count, 4] unit boxes side by side: box_overlap_model's slow case."""
    i = np.arange(count, dtype=np.float32)
    return np.stack([2 * i, np.zeros(count, np.float32), 2 * i + 1, np.ones(count, np.float32)], 1)[None].astype(np.float32)


def one_box(count: int) -> np.ndarray:
    """[1, count, 4], the same box `count` times: box_overlap_model's fast case."""
    return np.tile(np.array([0, 0, 1, 1], np.float32), (1, count, 1))
