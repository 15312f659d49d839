"""Helpers for `openinfer infer`: inputs from .npy files or generated from the model's metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from openinfer.client import Client, InferResult
from openinfer.wire.tensors import DATATYPE_TO_NUMPY


def generated_input(spec: dict[str, Any], fill: str, dynamic_dim: int, rng: np.random.Generator) -> np.ndarray:
    shape = [d if d >= 0 else dynamic_dim for d in spec["shape"]]
    datatype = spec["datatype"]
    if datatype == "BYTES":
        return np.full(shape, b"" if fill == "zeros" else b"openinfer", dtype=object)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if fill == "zeros":
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, 0), min(info.max, 255), shape, endpoint=True).astype(dtype)


def build_inputs(client: Client, model: str, version: int | None, given: tuple[str, ...], fill: str | None, dynamic_dim: int, file_path: Path | None = None) -> dict[str, Any]:
    feed: dict[str, Any] = {}
    if file_path is not None:
        taking = [spec for spec in client.metadata(model, version)["inputs"] if spec["datatype"] == "BYTES" and spec["shape"] == []]
        if len(taking) != 1:
            raise ValueError(f"--file needs a model with exactly one BYTES input of shape [] (a file's bytes, as magika with its steps takes them); {model} has {len(taking)}: use --input NAME=FILE.npy")
        feed[taking[0]["name"]] = file_path.read_bytes()
    for item in given:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--input takes NAME=FILE.npy, got {item!r}")
        feed[name] = np.load(path, allow_pickle=False)
    if fill:
        rng = np.random.default_rng(0)
        for spec in client.metadata(model, version)["inputs"]:
            if spec["name"] not in feed:
                feed[spec["name"]] = generated_input(spec, fill, dynamic_dim, rng)
    if not feed:
        raise ValueError("no inputs: give --input NAME=FILE.npy, --file PATH, or --random / --zeros")
    return feed


def summarize(array: np.ndarray, limit: int = 8) -> str:
    flat = array.reshape(-1)
    shown = ", ".join(_text(x) if array.dtype == object else f"{x:.6g}" if array.dtype.kind == "f" else str(x) for x in flat[:limit])
    return f"[{shown}{', …' if flat.size > limit else ''}]"


def _text(element: Any) -> str:
    """A BYTES element as the text it usually is (a label, a name), quoted; undecodable bytes escaped."""
    if isinstance(element, bytes):
        return repr(element.decode("utf-8", errors="backslashreplace"))
    return repr(element)


def describe_result(result: InferResult, full: bool = False) -> dict[str, Any]:
    outputs = {}
    for name, value in result.outputs.items():
        entry: dict[str, Any] = {"dtype": str(value.dtype), "shape": list(value.shape)}
        if full:
            entry["data"] = value.tolist() if value.dtype != object else [v.decode(errors="replace") for v in value.reshape(-1)]
        outputs[name] = entry
    described = {"model": result.model, "version": result.version, "outputs": outputs, "timing": result.timing}
    if result.stages is not None:
        described["stages"] = result.stages
    return described
