"""bfloat16 end to end: numpy has no such dtype, so the Python client sends `BF16Array` (uint16 bit
patterns), the worker hands them to onnxruntime as tensor(bfloat16) and copies BF16 outputs back out
as bits. Against the real sandboxed daemon, alone and batched, compared with onnxruntime in process."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

import onnx_builders
from openinfer.client import AsyncClient, BF16Array, OpenInferError
from openinfer.wire.tensors import decode_array, encode_array
from repo_builder import ModelRepo

VALUES = np.array([[1.0, -2.5, 0.15625, 3.0e38], [1e-40, -0.0, 65504.0, 1.0 / 3.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    repo = ModelRepo("oi-bf16-")
    repo.model("bf16", onnx_builders.bf16_model, config="workers = 1\n")
    repo.model("bf16_batched", onnx_builders.bf16_model, config="workers = 1\n[batching]\nmax_batch_size = 16\nmax_queue_delay_us = 20000\nquiet_us = 0\n")
    repo.model("bf16_scalar", onnx_builders.bf16_scalar_model, config="workers = 1\n")
    yield repo.ready()
    repo.remove()


def _widen(value: Any) -> np.ndarray:
    """A bfloat16 OrtValue as float32, converted by onnxruntime itself (exact)."""
    shape = [f"d{axis}" for axis in range(len(value.shape()))]
    widen = ort.InferenceSession(onnx_builders.cast_model(TensorProto.BFLOAT16, TensorProto.FLOAT, shape), providers=["CPUExecutionProvider"])
    return widen.run_with_ort_values(["y"], {"x": value})[0].numpy()  # type: ignore[no-any-return]


def reference(model: Path, bits: np.ndarray, input_name: str = "x") -> dict[str, np.ndarray]:
    """onnxruntime in process, through OrtValues (its Python API cannot return bfloat16 as numpy)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=16)
    names = [o.name for o in session.get_outputs()]
    out: dict[str, np.ndarray] = {}
    for name, value in zip(names, session.run_with_ort_values(names, {input_name: x})):
        if value.data_type() == "tensor(bfloat16)":
            # Widen to float32 in onnxruntime itself, then back to the upper 16 bits (exact for bfloat16).
            wide = _widen(value)
            out[name] = (wide.view(np.uint32) >> 16).astype(np.uint16)
        else:
            out[name] = value.numpy()
    return out


@pytest.mark.unit
def test_from_float32_rounds_like_onnxruntime_cast() -> None:
    rng = np.random.default_rng(16)
    values = np.concatenate([
        rng.standard_normal(4000).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 4000).astype(np.float32),
        (rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)).view(np.float32),  # every bit pattern class
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.3895314e38, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], dtype=np.float32),
    ]).reshape(-1, 4)
    cast = ort.InferenceSession(onnx_builders.cast_model(TensorProto.FLOAT, TensorProto.BFLOAT16), providers=["CPUExecutionProvider"])
    theirs = cast.run_with_ort_values(["y"], {"x": ort.OrtValue.ortvalue_from_numpy(values)})[0]
    their_bits = (_widen(theirs).view(np.uint32) >> 16).astype(np.uint16)
    ours = BF16Array.from_float32(values)
    nan = np.isnan(values)
    assert np.array_equal(ours.bits[~nan], their_bits[~nan])
    assert np.isnan(ours.to_float32()[nan]).all()


@pytest.mark.unit
def test_a_bf16_scalar_stays_rank_0_on_the_wire() -> None:
    """numpy's ascontiguousarray turns a 0-d array into shape (1,): neither conversion may."""
    scalar = BF16Array.from_float32(np.float32(-2.5))
    assert scalar.shape == () and scalar.to_float32() == np.float32(-2.5)
    assert BF16Array.from_float32(np.array(3.0, dtype=np.float64)).shape == ()
    datatype, shape, payload = encode_array(scalar)
    assert (datatype, shape, bytes(payload)) == ("BF16", [], scalar.bits.tobytes())
    assert decode_array(datatype, shape, payload).shape == ()
    big_endian = np.array(1.5, dtype=">f4")
    assert encode_array(big_endian)[:2] == ("FP32", [])


@pytest.mark.live
def test_bf16_scalars_in_and_out_through_the_daemon(daemon_factory: Any, repo: Path) -> None:
    """Rank-0 inputs and outputs of a model with BF16 outputs keep shape [] (metadata, PROTOCOL 6 and
    onnxruntime agree; the worker used to send [1])."""
    daemon = daemon_factory(repo)
    client = daemon.client()
    assert [o["shape"] for o in client.metadata("bf16_scalar")["outputs"]] == [[], [], []]
    s = BF16Array.from_float32(np.float32(-2.5))
    result = client.infer("bf16_scalar", {"s": s})
    want = reference(repo / "bf16_scalar" / "1" / "model.onnx", s.bits, input_name="s")
    assert {name: value.shape for name, value in want.items()} == {"y": (), "f": (), "h": ()}
    for name in ("y", "f", "h"):
        got = result.outputs[name]
        assert got.shape == () and got.dtype == want[name].dtype, (name, got.shape, got.dtype)
        assert np.array_equal(got, want[name]), name
    assert result.outputs["f"] == np.float32(-2.5) and BF16Array(result.outputs["h"]).to_float32() == np.float32(-1.25)


@pytest.mark.live
def test_bf16_in_and_out_through_the_daemon(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    x = BF16Array.from_float32(VALUES)
    with daemon.client() as client:
        result = client.infer("bf16", {"x": x})
    want = reference(repo / "bf16" / "1" / "model.onnx", x.bits)
    assert result.outputs["y"].dtype == np.uint16 and np.array_equal(result.outputs["y"], x.bits)
    assert np.array_equal(result.outputs["y"], want["y"])
    np.testing.assert_array_equal(result.outputs["f"], want["f"])
    np.testing.assert_array_equal(result.outputs["f"], x.to_float32())
    assert np.array_equal(result.outputs["d"], want["d"])
    # A plain float32 array is FP32, not BF16: refused by the daemon's checks before any worker runs.
    with pytest.raises(OpenInferError) as info, daemon.client() as client:
        client.infer("bf16", {"x": VALUES})
    assert info.value.code == "INVALID_ARGUMENT" and "BF16" in info.value.message


@pytest.mark.live
def test_bf16_batched_equals_alone(daemon_factory: Any, repo: Path) -> None:
    daemon = daemon_factory(repo)
    rng = np.random.default_rng(3)
    inputs = [BF16Array.from_float32(rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)) for _ in range(12)]

    async def main() -> list[Any]:
        async with AsyncClient(daemon.address, timeout=30) as client:
            return await asyncio.gather(*(client.infer("bf16_batched", {"x": x}) for x in inputs))

    results = asyncio.run(main())
    model = repo / "bf16_batched" / "1" / "model.onnx"
    for x, result in zip(inputs, results):
        want = reference(model, x.bits)
        for name in ("y", "d"):
            assert np.array_equal(result.outputs[name], want[name]), name
        np.testing.assert_array_equal(result.outputs["f"], want["f"])
    sizes = daemon.client().stats()["models"]["bf16_batched"]["batch_sizes"]["1"]
    assert max(int(k) for k in sizes) > 1 and sum(int(k) * n for k, n in sizes.items()) == len(inputs), sizes
