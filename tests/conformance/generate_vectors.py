"""Write tests/conformance/vectors.json: raw request frames and the reply each must get (docs/PROTOCOL.md).

    python tests/conformance/generate_vectors.py

Every vector is one multipart request and the expectation for its one reply, against a daemon serving
`examples/models` (tiny, silero_vad, magika, ocr_det, ocr_cls). Headers are packed with msgpack here,
or written byte by byte where the point is the encoding itself. Request ids are unique across the file,
so a client may also send all vectors on one socket and match replies by id.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from examples.sample_inputs import sample_inputs  # noqa: E402

OUT = HERE / "vectors.json"
UINT64_MAX = 2**64 - 1


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def spec(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def out(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def tiny_x(batch: int) -> bytes:
    return (np.arange(batch * 64, dtype="<f4").reshape(batch, 64) / 64).tobytes()


def fp32(shape: list[int]) -> bytes:
    count = int(np.prod(shape)) if shape else 1
    return (np.linspace(-1.0, 1.0, count, dtype=np.float64).astype("<f4")).reshape(shape).tobytes()


SILERO = sample_inputs("silero_vad")
SILERO_SPECS = [spec("input", "FP32", [1, 576]), spec("state", "FP32", [2, 1, 128]), spec("sr", "INT64", [])]
SILERO_FRAMES = [SILERO["input"].astype("<f4").tobytes(), SILERO["state"].astype("<f4").tobytes(), SILERO["sr"].astype("<i8").tobytes()]
SILERO_OUTPUTS = [out("output", "FP32", [1, 1]), out("stateN", "FP32", [2, 1, 128])]
MAGIKA = sample_inputs("magika")["bytes"].astype("<i4")


class Vectors:
    def __init__(self) -> None:
        self.cases: list[dict[str, Any]] = []
        self._next_id = 1000

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add(self, name: str, description: str, frames: list[bytes], expect: dict[str, Any]) -> None:
        assert all(case["name"] != name for case in self.cases), name
        self.cases.append({"name": name, "description": description, "request": {"frames_hex": [f.hex() for f in frames]}, "expect": expect})

    def header(self, op: str = "infer", **fields: Any) -> tuple[int, dict[str, Any]]:
        rid = self.new_id()
        head: dict[str, Any] = {"v": 1, "id": rid, "op": op}
        head.update(fields)
        return rid, head

    def error(self, name: str, description: str, code: str, frames: list[bytes], rid: int | None) -> None:
        self.add(name, description, frames, {"id": rid, "error": code})

    def infer_error(self, name: str, description: str, code: str, data: list[bytes], **fields: Any) -> None:
        rid, head = self.header("infer", **fields)
        self.error(name, description, code, [pack(head), *data], rid)

    def infer_ok(self, name: str, description: str, data: list[bytes], expected: list[dict[str, Any]], **fields: Any) -> None:
        rid, head = self.header("infer", **fields)
        self.add(name, description, [pack(head), *data], {"id": rid, "ok": True, "outputs": expected})

    def op_ok(self, name: str, description: str, op: str, keys: list[str], values: dict[str, Any] | None = None, **fields: Any) -> None:
        rid, head = self.header(op, **fields)
        expect: dict[str, Any] = {"id": rid, "ok": True, "result_keys": keys}
        if values:
            expect["result_values"] = values
        self.add(name, description, [pack(head)], expect)


def tiny_fields(batch: int = 1, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "inputs": [spec("x", "FP32", [batch, 64])], **extra}


def envelope_vectors(v: Vectors) -> None:
    v.error("not_msgpack", "Frame 0 is not msgpack (0xc1 is never used by msgpack). The id cannot be read: reply id is nil.",
            "INVALID_ARGUMENT", [b"\xc1\xc1garbage"], None)
    v.error("empty_header_frame", "A single empty frame: no msgpack object at all.", "INVALID_ARGUMENT", [b""], None)
    v.error("header_truncated", "A map that announces 3 entries but ends after one.", "INVALID_ARGUMENT", [pack({"v": 1, "id": 5, "op": "models"})[:6]], None)
    v.error("header_trailing_bytes", "A valid map followed by one more byte: frame 0 must hold exactly one msgpack object.",
            "INVALID_ARGUMENT", [pack({"v": 1, "id": v.new_id(), "op": "models"}) + b"\x00"], None)
    v.error("header_not_a_map", "Frame 0 is a msgpack array, not a map.", "INVALID_ARGUMENT", [pack([1, 2, 3])], None)
    v.error("header_integer_key", "A map key that is an integer makes the whole header invalid.", "INVALID_ARGUMENT",
            [pack({"v": 1, "id": v.new_id(), "op": "models", 7: "x"})], None)
    rid = v.new_id()
    v.error("header_keys_as_bin", "Keys packed as msgpack bin instead of str are not field names: `v` and `id` are missing.",
            "INVALID_ARGUMENT", [msgpack.packb({b"v": 1, b"id": rid, b"op": b"models"}, use_bin_type=True)], None)
    v.error("header_invalid_utf8", "A str whose bytes are not UTF-8 (here the value of `op`).", "INVALID_ARGUMENT",
            [b"\x83\xa1v\x01\xa2id\xcd\x03\xe8\xa2op\xa2\xff\xfe"], None)

    rid, head = v.header("models")
    del head["v"]
    v.error("version_missing", "No `v`. The id is readable, so it is echoed.", "INVALID_ARGUMENT", [pack(head)], rid)
    rid, head = v.header("models", v=2)
    v.error("version_2", "`v` is 2; this daemon speaks 1.", "INVALID_ARGUMENT", [pack(head)], rid)
    rid, head = v.header("models", v=0)
    v.error("version_0", "`v` is 0.", "INVALID_ARGUMENT", [pack(head)], rid)
    rid, head = v.header("models", v="1")
    v.error("version_string", "`v` is the string \"1\", not the integer 1.", "INVALID_ARGUMENT", [pack(head)], rid)

    v.error("id_missing", "No `id`: reply id is nil.", "INVALID_ARGUMENT", [pack({"v": 1, "op": "models"})], None)
    v.error("id_negative", "`id` is -5: ids are unsigned 64-bit. Reply id is nil.", "INVALID_ARGUMENT", [pack({"v": 1, "id": -5, "op": "models"})], None)
    v.error("id_string", "`id` is a string.", "INVALID_ARGUMENT", [pack({"v": 1, "id": "1001", "op": "models"})], None)
    v.error("id_float", "`id` is the float 7.0: integers only.", "INVALID_ARGUMENT", [pack({"v": 1, "id": 7.0, "op": "models"})], None)
    v.error("id_bool", "`id` is true: a boolean is not an integer.", "INVALID_ARGUMENT", [pack({"v": 1, "id": True, "op": "models"})], None)
    v.error("id_nil", "`id` is nil.", "INVALID_ARGUMENT", [pack({"v": 1, "id": None, "op": "models"})], None)
    v.add("id_zero", "`id` 0 is valid.", [pack({"v": 1, "id": 0, "op": "health"})], {"id": 0, "ok": True, "result_keys": ["ready", "draining", "not_ready", "failed"]})
    v.add("id_uint64_max", "`id` 2^64-1 (msgpack uint 64) is valid and echoed unchanged.",
          [pack({"v": 1, "id": UINT64_MAX, "op": "health"})], {"id": UINT64_MAX, "ok": True, "result_keys": ["ready", "draining", "not_ready", "failed"]})

    rid, head = v.header("explode")
    v.error("op_unknown", "An operation the daemon does not know.", "INVALID_ARGUMENT", [pack(head)], rid)
    rid, head = v.header("INFER", **tiny_fields())
    v.error("op_wrong_case", "Operation names are case-sensitive.", "INVALID_ARGUMENT", [pack(head), tiny_x(1)], rid)
    rid, head = v.header("models")
    del head["op"]
    v.error("op_missing", "No `op`.", "INVALID_ARGUMENT", [pack(head)], rid)
    rid = v.new_id()
    v.error("op_as_bin", "`op` packed as msgpack bin: text values must be str.", "INVALID_ARGUMENT",
            [msgpack.packb({"v": 1, "id": rid, "op": b"models"}, use_bin_type=True)], rid)
    rid, head = v.header("load", model="tiny")
    v.error("op_load_reserved", "`load` is a reserved name: not supported by this daemon.", "INVALID_ARGUMENT", [pack(head)], rid)
    rid, head = v.header("unload", model="tiny")
    v.error("op_unload_reserved", "`unload` is a reserved name: not supported by this daemon.", "INVALID_ARGUMENT", [pack(head)], rid)

    v.infer_error("client_name_too_long", "`client` has 65 characters; the limit is 64.", "INVALID_ARGUMENT", [tiny_x(1)], **tiny_fields(client="c" * 65))
    v.infer_error("client_name_not_string", "`client` is an integer.", "INVALID_ARGUMENT", [tiny_x(1)], **tiny_fields(client=12))
    rid, head = v.header("models", client="c" * 65)
    v.error("client_name_checked_on_every_op", "`client` is checked for every operation, not only infer.", "INVALID_ARGUMENT", [pack(head)], rid)

    rid, head = v.header("infer", **tiny_fields())
    v.error("too_many_frames", "Header + 257 data frames = 258 frames; the limit is 257.", "RESOURCE_EXHAUSTED", [pack(head)] + [b"\x00"] * 257, rid)
    rid, head = v.header("models")
    v.error("too_many_frames_before_op_checks", "The frame limit is checked before the `models` no-data-frames rule.",
            "RESOURCE_EXHAUSTED", [pack(head)] + [b"\x00"] * 300, rid)
    rid, head = v.header("infer", **tiny_fields())
    v.error("frames_257_is_within_limit", "Header + 256 data frames is within the frame limit; it fails later on the tensor count.",
            "INVALID_ARGUMENT", [pack(head)] + [b"\x00"] * 256, rid)
    rid, head = v.header("models")
    v.error("data_frames_on_models", "`models` takes no data frames.", "INVALID_ARGUMENT", [pack(head), b"extra"], rid)
    rid, head = v.header("health")
    v.error("empty_data_frame_on_health", "Even an empty second frame counts as a data frame.", "INVALID_ARGUMENT", [pack(head), b""], rid)

    rid, head = v.header("health", pad="")
    size = len(pack(head))
    head["pad"] = "p" * (65536 - size - 2)  # the str grows from fixstr to str 16: 2 more length bytes
    exact = pack(head)
    assert len(exact) == 65536, len(exact)
    v.add("header_exactly_64KiB", "A 65,536-byte header (unknown key `pad` is ignored) is within the limit.", [exact],
          {"id": rid, "ok": True, "result_keys": ["ready", "draining", "not_ready", "failed"]})
    rid, head = v.header("health", pad="p" * 65536)
    v.error("header_over_64KiB", "A header over 65,536 bytes is refused before it is decoded, so the reply id is nil.",
            "RESOURCE_EXHAUSTED", [pack(head)], None)


def hand_packed_infer(rid: int) -> bytes:
    """{v, id, op, model, inputs:[{name, datatype, shape}]} with deliberately non-minimal encodings."""

    def str8(text: str) -> bytes:
        raw = text.encode()
        return b"\xd9" + bytes([len(raw)]) + raw

    def str16(text: str) -> bytes:
        raw = text.encode()
        return b"\xda" + struct.pack(">H", len(raw)) + raw

    return b"".join(
        [
            b"\xde" + struct.pack(">H", 5),  # map 16 with 5 entries
            str8("v"), b"\xcf" + struct.pack(">Q", 1),  # uint 64
            str16("id"), b"\xd3" + struct.pack(">q", rid),  # int 64 (signed, positive value)
            b"\xdb" + struct.pack(">I", 2) + b"op", str8("infer"),  # str 32 key
            str8("model"), str8("tiny"),
            str8("inputs"), b"\xdd" + struct.pack(">I", 1),  # array 32 with 1 element
            b"\xde" + struct.pack(">H", 3),
            str8("name"), str8("x"),
            str8("datatype"), str16("FP32"),
            str8("shape"), b"\xdc" + struct.pack(">H", 2), b"\xd0\x01", b"\xcd\x00\x40",  # int 8 = 1, uint 16 = 64
        ]
    )


def infer_success_vectors(v: Vectors) -> None:
    v.infer_ok("tiny_batch_1", "tiny: x FP32[1,64] -> y FP32[1,64].", [tiny_x(1)], [out("y", "FP32", [1, 64])], **tiny_fields(1))
    v.infer_ok("tiny_batch_3", "tiny with a batch of 3 on the dynamic first dimension.", [tiny_x(3)], [out("y", "FP32", [3, 64])], **tiny_fields(3))
    v.infer_ok("tiny_batch_0", "A zero-element tensor: shape [0,64], empty data frame; the output frame is empty too.",
               [b""], [out("y", "FP32", [0, 64])], **tiny_fields(0))
    v.infer_ok("tiny_explicit_version", "`version` 1 names the served version.", [tiny_x(1)], [out("y", "FP32", [1, 64])], **tiny_fields(1, version=1))
    v.infer_ok("tiny_all_optional_fields", "Every optional infer field set: version, outputs, timeout_ms, client, priority.",
               [tiny_x(2)], [out("y", "FP32", [2, 64])], **tiny_fields(2, version=1, outputs=["y"], timeout_ms=10_000, client="conformance", priority=3))
    v.infer_ok("tiny_optional_fields_nil", "Optional fields set to nil are treated as absent.", [tiny_x(1)], [out("y", "FP32", [1, 64])],
               **tiny_fields(1, version=None, outputs=None, timeout_ms=None, client=None, priority=None))
    v.infer_ok("tiny_unknown_keys_ignored", "Unknown keys in the header and in an input spec are ignored.", [tiny_x(1)], [out("y", "FP32", [1, 64])],
               model="tiny", inputs=[{**spec("x", "FP32", [1, 64]), "parameters": {"note": 1}}], trace={"span": "abc", "n": [1, 2]}, x_future=True)
    v.infer_ok("tiny_client_name_64_chars", "`client` of exactly 64 characters (here 128 UTF-8 bytes): the limit counts characters.",
               [tiny_x(1)], [out("y", "FP32", [1, 64])], **tiny_fields(1, client="\u00e9" * 64))
    rid = v.new_id()
    v.add("tiny_non_minimal_encodings", "Header written by hand with map 16, str 8/16/32, uint 64, int 64, int 8, uint 16, array 16/32: "
          "any msgpack encoding of a value is accepted.", [hand_packed_infer(rid), tiny_x(1)],
          {"id": rid, "ok": True, "outputs": [out("y", "FP32", [1, 64])]})
    v.infer_ok("silero_vad_int64_scalar", "silero_vad: three inputs including `sr`, an INT64 scalar (shape [], 8 bytes); two outputs in model order.",
               SILERO_FRAMES, SILERO_OUTPUTS, model="silero_vad", inputs=SILERO_SPECS)
    order = [2, 0, 1]
    v.infer_ok("silero_vad_inputs_any_order", "Inputs may be listed in any order; data frames follow the order of `inputs`.",
               [SILERO_FRAMES[i] for i in order], SILERO_OUTPUTS, model="silero_vad", inputs=[SILERO_SPECS[i] for i in order])
    v.infer_ok("silero_vad_outputs_filter", "`outputs` asks for one output: only it is returned.", SILERO_FRAMES,
               [out("stateN", "FP32", [2, 1, 128])], model="silero_vad", inputs=SILERO_SPECS, outputs=["stateN"])
    v.infer_ok("silero_vad_outputs_order", "Outputs come back in the order `outputs` lists them.", SILERO_FRAMES,
               [out("stateN", "FP32", [2, 1, 128]), out("output", "FP32", [1, 1])], model="silero_vad", inputs=SILERO_SPECS, outputs=["stateN", "output"])
    v.infer_ok("magika_int32", "magika: INT32[1,2048] -> FP32[1,214].", [MAGIKA.tobytes()], [out("target_label", "FP32", [1, 214])],
               model="magika_scores", inputs=[spec("bytes", "INT32", [1, 2048])])
    script = b"#!/usr/bin/env python3\nimport sys\n\nfor line in sys.stdin:\n    print(line.upper(), end='')\n"
    v.infer_ok("magika_steps_bytes", "magika with its steps: one file's bytes as a BYTES scalar (shape [], a 4-byte little-endian length then the bytes) -> its content type.",
               [len(script).to_bytes(4, "little") + script],
               [out("label", "BYTES", []), out("group", "BYTES", []), out("mime_type", "BYTES", []), out("score", "FP32", [])],
               model="magika", inputs=[spec("bytes", "BYTES", [])])
    v.infer_ok("ocr_det_dynamic_4d", "ocr_det: x FP32[-1,3,-1,-1] given [1,3,32,64] (H and W multiples of 32).", [fp32([1, 3, 32, 64])],
               [out("sigmoid_0.tmp_0", "FP32", [1, 1, 32, 64])], model="ocr_det", inputs=[spec("x", "FP32", [1, 3, 32, 64])])
    v.infer_ok("ocr_cls_batch_2", "ocr_cls: batch of 2; the output name contains a slash.", [fp32([2, 3, 32, 32])],
               [out("save_infer_model/scale_0.tmp_1", "FP32", [2, 2])], model="ocr_cls", inputs=[spec("x", "FP32", [2, 3, 32, 32])])


def infer_error_vectors(v: Vectors) -> None:
    x1 = tiny_x(1)
    v.infer_error("model_unknown", "No model of that name: NOT_FOUND (details.models lists the served ones).", "NOT_FOUND", [x1],
                  model="no_such_model", inputs=[spec("x", "FP32", [1, 64])])
    v.infer_error("model_checked_before_tensors", "The model is resolved before the tensors are looked at.", "NOT_FOUND", [],
                  model="no_such_model", inputs="garbage")
    v.infer_error("version_unknown", "tiny has no version 9.", "NOT_FOUND", [x1], **tiny_fields(version=9))
    v.infer_error("version_negative", "A negative version is never served.", "NOT_FOUND", [x1], **tiny_fields(version=-1))
    v.infer_error("version_not_integer", "`version` must be an integer.", "INVALID_ARGUMENT", [x1], **tiny_fields(version="1"))
    v.infer_error("version_bool", "`version` true is not an integer.", "INVALID_ARGUMENT", [x1], **tiny_fields(version=True))
    v.infer_error("inputs_missing", "No `inputs` field.", "INVALID_ARGUMENT", [], model="tiny")
    v.infer_error("inputs_not_array", "`inputs` is a string.", "INVALID_ARGUMENT", [x1], model="tiny", inputs="x")
    v.infer_error("frame_count_less_than_inputs", "`inputs` lists 1 tensor, no data frame follows.", "INVALID_ARGUMENT", [], **tiny_fields())
    v.infer_error("frame_count_more_than_inputs", "`inputs` lists 1 tensor, 2 data frames follow.", "INVALID_ARGUMENT", [x1, x1], **tiny_fields())
    v.infer_error("input_spec_not_map", "An element of `inputs` is not a map.", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[["x", "FP32", [1, 64]]])
    v.infer_error("input_name_not_string", "`name` is an integer.", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[spec(1, "FP32", [1, 64])])  # type: ignore[arg-type]
    v.infer_error("input_unknown", "An input the model does not have (after a correct one).", "INVALID_ARGUMENT", [x1, x1],
                  model="tiny", inputs=[spec("x", "FP32", [1, 64]), spec("extra", "FP32", [1, 64])])
    v.infer_error("input_duplicate", "The same input twice.", "INVALID_ARGUMENT", [x1, x1], model="tiny", inputs=[spec("x", "FP32", [1, 64])] * 2)
    v.infer_error("input_missing", "silero_vad without `sr`.", "INVALID_ARGUMENT", SILERO_FRAMES[:2], model="silero_vad", inputs=SILERO_SPECS[:2])
    v.infer_error("input_missing_empty_inputs", "`inputs` is an empty array.", "INVALID_ARGUMENT", [], model="tiny", inputs=[])
    v.infer_error("datatype_unknown", "\"FLOAT\" is not a datatype name.", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[spec("x", "FLOAT", [1, 64])])
    v.infer_error("datatype_lower_case", "Datatype names are upper case.", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[spec("x", "fp32", [1, 64])])
    v.infer_error("datatype_mismatch_fp64", "FP64 data for an FP32 input (no conversion is done).", "INVALID_ARGUMENT",
                  [np.zeros((1, 64), "<f8").tobytes()], model="tiny", inputs=[spec("x", "FP64", [1, 64])])
    v.infer_error("datatype_mismatch_bytes", "BYTES is a known datatype, but not this input's.", "INVALID_ARGUMENT",
                  [struct.pack("<I", 1) + b"a"], model="tiny", inputs=[spec("x", "BYTES", [1])])
    v.infer_error("datatype_mismatch_bf16", "BF16 is a known datatype, but not this input's.", "INVALID_ARGUMENT",
                  [b"\x00" * 128], model="tiny", inputs=[spec("x", "BF16", [1, 64])])
    frames = list(SILERO_FRAMES)
    frames[2] = np.array(16000, "<i4").tobytes()
    specs = list(SILERO_SPECS)
    specs[2] = spec("sr", "INT32", [])
    v.infer_error("datatype_mismatch_int32_scalar", "silero_vad `sr` sent as INT32 instead of INT64.", "INVALID_ARGUMENT", frames, model="silero_vad", inputs=specs)
    v.infer_error("shape_not_array", "`shape` is an integer.", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[{"name": "x", "datatype": "FP32", "shape": 64}])
    v.infer_error("shape_negative_dim", "-1 is for metadata only; request shapes are concrete.", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[spec("x", "FP32", [-1, 64])])
    v.infer_error("shape_float_dim", "A dimension given as a float.", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[{"name": "x", "datatype": "FP32", "shape": [1.0, 64]}])
    v.infer_error("rank_too_small", "x as [64] instead of [batch, 64].", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[spec("x", "FP32", [64])])
    v.infer_error("rank_too_large", "x as [1,1,64].", "INVALID_ARGUMENT", [x1], model="tiny", inputs=[spec("x", "FP32", [1, 1, 64])])
    specs = list(SILERO_SPECS)
    specs[2] = spec("sr", "INT64", [1])
    v.infer_error("scalar_sent_as_rank_1", "silero_vad `sr` with shape [1]: a scalar has shape [] (the daemon checks rank; onnxruntime would not).",
                  "INVALID_ARGUMENT", SILERO_FRAMES, model="silero_vad", inputs=specs)
    v.infer_error("fixed_dim_mismatch", "x as [1,63]: dimension 1 is fixed at 64.", "INVALID_ARGUMENT", [np.zeros((1, 63), "<f4").tobytes()],
                  model="tiny", inputs=[spec("x", "FP32", [1, 63])])
    v.infer_error("fixed_dim_mismatch_magika", "magika `bytes` as [1,2047]: dimension 1 is fixed at 2048.", "INVALID_ARGUMENT",
                  [MAGIKA[:, :2047].tobytes()], model="magika_scores", inputs=[spec("bytes", "INT32", [1, 2047])])
    v.infer_error("fixed_dim_mismatch_4d", "ocr_det x with 1 channel: dimension 1 is fixed at 3.", "INVALID_ARGUMENT", [fp32([1, 1, 32, 32])],
                  model="ocr_det", inputs=[spec("x", "FP32", [1, 1, 32, 32])])
    v.infer_error("byte_length_short", "FP32[1,64] needs 256 bytes; the frame has 252.", "INVALID_ARGUMENT", [x1[:-4]], **tiny_fields())
    v.infer_error("byte_length_long", "FP32[1,64] needs 256 bytes; the frame has 260.", "INVALID_ARGUMENT", [x1 + b"\x00" * 4], **tiny_fields())
    v.infer_error("byte_length_zero_elements", "Shape [0,64] needs 0 bytes; the frame has 4.", "INVALID_ARGUMENT", [b"\x00" * 4], **tiny_fields(0))
    v.infer_error("byte_length_scalar", "An INT64 scalar needs exactly 8 bytes; the frame has 4.", "INVALID_ARGUMENT",
                  SILERO_FRAMES[:2] + [SILERO_FRAMES[2][:4]], model="silero_vad", inputs=SILERO_SPECS)
    v.infer_error("outputs_unknown", "`outputs` names an output the model does not have.", "INVALID_ARGUMENT", [x1], **tiny_fields(outputs=["nope"]))
    v.infer_error("outputs_empty", "`outputs` is an empty array (omit it to get every output).", "INVALID_ARGUMENT", [x1], **tiny_fields(outputs=[]))
    v.infer_error("outputs_duplicate", "`outputs` names y twice.", "INVALID_ARGUMENT", [x1], **tiny_fields(outputs=["y", "y"]))
    v.infer_error("outputs_not_array", "`outputs` is a string.", "INVALID_ARGUMENT", [x1], **tiny_fields(outputs="y"))
    v.infer_error("timeout_zero", "`timeout_ms` 0.", "INVALID_ARGUMENT", [x1], **tiny_fields(timeout_ms=0))
    v.infer_error("timeout_negative", "`timeout_ms` -5.", "INVALID_ARGUMENT", [x1], **tiny_fields(timeout_ms=-5))
    v.infer_error("timeout_float", "`timeout_ms` 1.5: integers only.", "INVALID_ARGUMENT", [x1], **tiny_fields(timeout_ms=1.5))
    v.infer_error("timeout_bool", "`timeout_ms` true.", "INVALID_ARGUMENT", [x1], **tiny_fields(timeout_ms=True))
    v.infer_error("timeout_too_long", "`timeout_ms` 2**31: longer than the protocol allows (at most 2**31 - 1 ms).", "INVALID_ARGUMENT", [x1], **tiny_fields(timeout_ms=2**31))
    v.infer_error("priority_not_integer", "`priority` must be an integer.", "INVALID_ARGUMENT", [x1], **tiny_fields(priority="high"))
    v.infer_error("model_fails_at_run_time", "ocr_det with H=W=40 passes every check but fails inside the model (H and W must be multiples "
                  "of 32). The worker's error arrives with timing; onnxruntime reports it as FAIL with a kernel's shape complaint, "
                  "which is the caller's mistake: INVALID_ARGUMENT (PROTOCOL.md 8.3).",
                  "INVALID_ARGUMENT", [fp32([1, 3, 40, 40])], model="ocr_det", inputs=[spec("x", "FP32", [1, 3, 40, 40])])


def admin_vectors(v: Vectors) -> None:
    v.op_ok("models", "List every model version and its state.", "models", ["models"])
    v.op_ok("metadata", "Metadata of the newest served version of tiny.", "metadata", ["name", "versions", "version", "platform", "inputs", "outputs"],
            {"name": "tiny", "versions": [1], "version": 1, "platform": "onnxruntime_onnx",
             "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}], "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}]},
            model="tiny")
    v.op_ok("metadata_silero_vad", "Metadata: a rank-0 input has shape [].", "metadata", ["name", "inputs", "outputs"],
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1]}, {"name": "state", "datatype": "FP32", "shape": [2, -1, 128]},
                        {"name": "sr", "datatype": "INT64", "shape": []}]}, model="silero_vad")
    v.op_ok("metadata_explicit_version", "Metadata of version 1.", "metadata", ["name", "version"], {"name": "magika_scores", "version": 1}, model="magika_scores", version=1)
    rid, head = v.header("metadata", model="no_such_model")
    v.error("metadata_model_unknown", "Metadata of a model that does not exist.", "NOT_FOUND", [pack(head)], rid)
    rid, head = v.header("metadata", model="tiny", version=9)
    v.error("metadata_version_unknown", "Metadata of a version that does not exist.", "NOT_FOUND", [pack(head)], rid)
    rid, head = v.header("metadata")
    v.error("metadata_model_missing", "`metadata` needs `model`.", "INVALID_ARGUMENT", [pack(head)], rid)
    v.op_ok("health", "Readiness: every example model has a ready worker.", "health", ["ready", "draining", "not_ready", "failed"],
            {"ready": True, "draining": False, "not_ready": [], "failed": []})
    v.op_ok("status", "Daemon, model and worker state.", "status", ["pid", "address", "uptime_s", "draining", "sandbox", "models", "workers", "queued", "in_flight"])
    v.op_ok("stats", "Per-model and per-client counters.", "stats", ["models", "clients", "rejected"])
    v.op_ok("cancel_unknown_target", "Cancelling an id that is not queued on this connection is not an error.", "cancel", ["cancelled"],
            {"cancelled": False}, target=987654321)
    v.op_ok("cancel_without_target", "`cancel` without `target` cancels nothing.", "cancel", ["cancelled"], {"cancelled": False})


def consistency_vectors(v: Vectors) -> None:
    """Added after the first release of the vectors (ids continue from there)."""
    x1 = tiny_x(1)
    v.infer_error("infer_model_missing", "`infer` without `model`: a malformed request, not an unknown model.", "INVALID_ARGUMENT", [x1],
                  inputs=[spec("x", "FP32", [1, 64])])
    v.infer_error("infer_model_not_string", "`model` is an integer.", "INVALID_ARGUMENT", [x1], model=7, inputs=[spec("x", "FP32", [1, 64])])
    rid, head = v.header("models", v=1.0)
    v.error("protocol_version_float", "`v` is the float 1.0, not the integer 1.", "INVALID_ARGUMENT", [pack(head)], rid)
    rid, head = v.header("models", v=True)
    v.error("protocol_version_bool", "`v` is true, not the integer 1.", "INVALID_ARGUMENT", [pack(head)], rid)


def build() -> list[dict[str, Any]]:
    v = Vectors()
    envelope_vectors(v)
    infer_success_vectors(v)
    infer_error_vectors(v)
    admin_vectors(v)
    consistency_vectors(v)
    ids = [case["expect"]["id"] for case in v.cases if case["expect"]["id"] is not None]
    assert len(ids) == len(set(ids)), "request ids must be unique across the vectors"
    return v.cases


def main() -> None:
    cases = build()
    OUT.write_text(json.dumps(cases, indent=1, ensure_ascii=True) + "\n")
    print(f"{OUT}: {len(cases)} vectors")


if __name__ == "__main__":
    main()
