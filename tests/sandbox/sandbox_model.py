"""A small but realistic test model: a 64x64 MatMul and a 4-D Conv, both with dynamic batch/spatial dims.

Built with onnx.helper so no binary fixture is checked in. Importing onnx does not import onnxruntime,
so the pytest process stays safe to fork from.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MATMUL_WIDTH = 64
CONV_IN_CHANNELS = 3
CONV_OUT_CHANNELS = 8


def build_model(path: str | os.PathLike[str]) -> str:
    """Write the model to `path` and return the path as str.

    Inputs: x [N, 64] float32 and img [N, 3, H, W] float32. Outputs: y = x @ W and feat = Conv(img) (3x3, pad 1).
    """
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.standard_normal((MATMUL_WIDTH, MATMUL_WIDTH)).astype(np.float32), "W")
    kernel = numpy_helper.from_array(
        rng.standard_normal((CONV_OUT_CHANNELS, CONV_IN_CHANNELS, 3, 3)).astype(np.float32), "K"
    )
    bias = numpy_helper.from_array(rng.standard_normal(CONV_OUT_CHANNELS).astype(np.float32), "B")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("Conv", ["img", "K", "B"], ["feat"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "sandbox_test_model",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", MATMUL_WIDTH]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["M", CONV_IN_CHANNELS, "H", "W_"]),
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", MATMUL_WIDTH]),
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["M", CONV_OUT_CHANNELS, "H", "W_"]),
        ],
        initializer=[weight, kernel, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return os.fspath(path)


def expected_outputs(path: str | os.PathLike[str], x: np.ndarray) -> np.ndarray:
    """The MatMul output computed with numpy, to check the sandboxed worker's answers."""
    model = onnx.load(os.fspath(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return np.asarray(x @ weights["W"], dtype=np.float32)
