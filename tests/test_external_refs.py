"""The worker's own listing of external-data references (daemon/worker/external_refs.py), against onnx's:
every place a TensorProto can sit is found, and no input makes it do anything but list or refuse."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_builders
from openinfer.daemon.worker.external_refs import MAX_DEPTH, ExternalRef, MalformedModel, external_refs

pytestmark = pytest.mark.unit


def ref(name: str) -> TensorProto:
    return onnx_builders.external_reference(name, f"{name}.bin", 4)


def sparse(name: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(ref(f"{name}_values"), ref(f"{name}_indices"), [8])


def model_with_a_reference_everywhere() -> onnx.ModelProto:
    """One external tensor in each of the places listed in external_refs' docstring."""
    subgraph = helper.make_graph([helper.make_node("Identity", ["s"], ["s_out"], value=ref("node_in_subgraph_t"))], "sub", [], [], initializer=[ref("subgraph_initializer")])
    node = helper.make_node(
        "Custom", [], ["y"], domain="test",
        t=ref("attribute_t"), g=subgraph, tensors=[ref("attribute_tensors")], graphs=[helper.make_graph([], "g2", [], [], initializer=[ref("attribute_graphs")])],
        sparse_tensor=sparse("attribute_sparse"), sparse_tensors=[sparse("attribute_sparses")],
    )
    graph = helper.make_graph([node], "main", [], [], initializer=[ref("initializer")], sparse_initializer=[sparse("sparse_initializer")])
    model = helper.make_model(graph, opset_imports=onnx_builders.OPSET)
    model.functions.append(helper.make_function("test", "f", [], [], [helper.make_node("Constant", [], ["c"], value=ref("function_node_t"))], onnx_builders.OPSET))
    # A function attribute's default value, which onnxruntime inlines where a node refers to it (round 72:
    # missed, and onnxruntime read the file its location named, relative to the working directory).
    model.functions[0].attribute_proto.append(helper.make_attribute("blob", ref("function_attribute_default")))
    training = model.training_info.add()
    training.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[ref("training_initialization")]))
    training.algorithm.CopyFrom(helper.make_graph([], "algo", [], [], initializer=[ref("training_algorithm")]))
    return model


def test_every_place_a_tensor_can_sit_is_found() -> None:
    model = model_with_a_reference_everywhere()
    found = {r.tensor for r in external_refs(model.SerializeToString())}
    assert found >= {t.name for t in onnx.external_data_helper._get_all_tensors(model)}  # onnx's own walk
    expected = {
        "initializer", "subgraph_initializer", "node_in_subgraph_t", "attribute_t", "attribute_tensors", "attribute_graphs",
        "function_node_t", "function_attribute_default", "training_initialization", "training_algorithm",
        *(f"{sparse}_{part}" for sparse in ("sparse_initializer", "attribute_sparse", "attribute_sparses") for part in ("values", "indices")),
    }
    assert found == expected
    assert all(r.location == f"{r.tensor}.bin" for r in external_refs(model.SerializeToString()))


def test_plain_models_have_none_and_a_tensor_marked_external_without_a_location_is_reported() -> None:
    weight = numpy_helper.from_array(np.ones(4, np.float32), "W")
    graph = helper.make_graph([helper.make_node("Identity", ["W"], ["y"])], "plain", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[weight])
    assert external_refs(helper.make_model(graph).SerializeToString()) == []
    graph.initializer[0].data_location = TensorProto.EXTERNAL
    assert external_refs(helper.make_model(graph).SerializeToString()) == [ExternalRef("W", None)]


def nested_subgraphs(levels: int) -> bytes:
    """A model whose graph holds a node whose attribute holds a graph ... `levels` times, written directly in
    the wire format (protobuf's own classes refuse to build it past their recursion limit)."""
    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    graph = field(5, ref("deepest").SerializeToString())  # GraphProto.initializer
    for _ in range(levels):
        graph = field(1, field(5, field(6, graph)))  # GraphProto.node -> NodeProto.attribute -> AttributeProto.g
    return field(7, graph)  # ModelProto.graph


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def test_nesting_deeper_than_protobufs_limit_is_refused() -> None:
    assert external_refs(nested_subgraphs(10)) == [ExternalRef("deepest", "deepest.bin")]
    with pytest.raises(MalformedModel, match="nested"):
        external_refs(nested_subgraphs(MAX_DEPTH // 3 + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_are_listed_or_refused_as_malformed(data: bytes) -> None:
    try:
        refs = external_refs(data)
    except MalformedModel:
        return
    assert all(isinstance(r, ExternalRef) for r in refs)
