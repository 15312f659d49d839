"""The reply headers of one batch's members, packed from pieces prepared once per batch.

Members of a batch differ only in their id, their rows (dimension 0 of each output's shape) and four
timing values (accounting.MEMBER_STAGES); everything else is the same for all of them. Packing each
header as a dict cost ~2.5 us per member in the supervisor's loop, the throughput ceiling under load:
here a member costs one struct.pack and a join. The bytes decode to the same map `msgpack.packb` would
give for {"v", "model", "version", "batch_size", "id", "outputs", "timing"} (tests/test_reply_headers.py).
"""
from __future__ import annotations

import struct
from typing import Any

import msgpack

from openinfer.wire.protocol import PROTOCOL_VERSION

from openinfer.daemon.observability.accounting import MEMBER_STAGES

_FLOAT64 = 0xCB  # msgpack float 64, what packb writes for a Python float


_PACKER = msgpack.Packer()  # for its map and array headers alone (packb has no way to write those)
_map_header = _PACKER.pack_map_header
_array_header = _PACKER.pack_array_header


_OWN_KEYS = [msgpack.packb(key) for key in MEMBER_STAGES]
_OWN = struct.Struct(">" + "".join(f"{len(key)}sBd" for key in _OWN_KEYS))  # key, 0xcb, value; four times
_K0, _K1, _K2, _K3 = _OWN_KEYS
_F64 = struct.Struct(">Bd")  # a shared timing value: 0xcb, float 64
_TIMING_KEY = msgpack.packb("timing")


_TEMPLATE_CACHE_MAX = 4096  # distinct (model, version, batch size, output specs) kept; then start over
_templates: dict[tuple[Any, ...], tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = {}
_packed_keys: dict[str, bytes] = {}


def _template(name: str, version: int, batch_size: int, specs: list[dict[str, Any]]) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(head up to the id, "outputs" + its array header, per output the packed spec before and after
    dimension 0): the same for every batch of one size and output signature, so packed once."""
    key = (name, version, batch_size, tuple((s["name"], s["datatype"], tuple(s["shape"][1:])) for s in specs))
    template = _templates.get(key)
    if template is not None:
        return template
    head = b"".join(
        [
            _map_header(7),
            msgpack.packb("v"), msgpack.packb(PROTOCOL_VERSION),
            msgpack.packb("model"), msgpack.packb(name),
            msgpack.packb("version"), msgpack.packb(version),
            msgpack.packb("batch_size"), msgpack.packb(batch_size),
            msgpack.packb("id"),
        ]
    )
    outputs_head = msgpack.packb("outputs") + _array_header(len(specs))
    pieces: list[tuple[bytes, bytes]] = []
    for spec in specs:
        shape = spec["shape"]
        before = b"".join([
            _map_header(3),
            msgpack.packb("name"), msgpack.packb(spec["name"]),
            msgpack.packb("datatype"), msgpack.packb(spec["datatype"]),
            msgpack.packb("shape"), _array_header(len(shape)),
        ])
        pieces.append((before, b"".join(msgpack.packb(d) for d in shape[1:])))
    if len(_templates) >= _TEMPLATE_CACHE_MAX:  # a client varying shapes without end must not grow this
        _templates.clear()
    template = _templates[key] = (head, outputs_head, pieces)
    return template


def _packed_key(key: str) -> bytes:
    packed = _packed_keys.get(key)
    if packed is None:
        packed = _packed_keys[key] = msgpack.packb(key)  # timing keys: a handful of fixed names
    return packed



class BatchReplyHeaders:
    """`render(request_id, rows, own)` -> a member's packed reply header, for a batch whose outputs are
    cut by rows (layout "rows": `specs` = the batch's output specs, dimension 0 = all rows). What does
    not depend on the batch's timing is cached across batches (`_template`)."""

    def __init__(self, name: str, version: int, batch_size: int, specs: list[dict[str, Any]], shared_timing: dict[str, float]) -> None:
        self._head, self._outputs_head, self._specs = _template(name, version, batch_size, specs)
        self._timing_head = _TIMING_KEY + _map_header(len(MEMBER_STAGES) + len(shared_timing))
        self._timing_tail = b"".join(
            [_packed_key(key) + (_F64.pack(_FLOAT64, value) if type(value) is float else msgpack.packb(value)) for key, value in shared_timing.items()]
        )

    def render(self, request_id: int, rows: int, own: tuple[float, float, float, float]) -> bytes:
        packed_rows = msgpack.packb(rows)
        parts = [self._head, msgpack.packb(request_id), self._outputs_head]
        for before, after in self._specs:
            parts += (before, packed_rows, after)
        own_packed = _OWN.pack(_K0, _FLOAT64, own[0], _K1, _FLOAT64, own[1], _K2, _FLOAT64, own[2], _K3, _FLOAT64, own[3])
        parts += (self._timing_head, own_packed, self._timing_tail)
        return b"".join(parts)
