"""The worker's serving loop: a closed set of operations (TASK, BATCH, PING, QUIT); nothing else is
executed. Messages arrive on the worker's socketpair with the supervisor (openinfer.wire.zmtp framing)."""
from __future__ import annotations

import logging
import select
import time
from typing import Any

import numpy as np

from openinfer.wire.protocol import pack, unpack
from openinfer.wire.tensors import BF16Array, decode_array, encode_array
from openinfer.wire.zmtp import Buffer, FrameStream, Oversized, PeerClosed

from . import messages
from .session import Runner, bf16_input, task_error

log = logging.getLogger("openinfer.worker")


def serve(channel: FrameStream, session: Any, output_names: list[str]) -> None:
    """Run tasks until QUIT. Returns normally on QUIT or when the supervisor is gone."""
    session = Runner(session)  # .run() as onnxruntime's, BF16 outputs included
    fd = channel.sock.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    watching_out = False
    try:
        while True:
            if bool(channel.out_bytes) != watching_out:
                watching_out = not watching_out
                poller.modify(fd, select.POLLIN | (select.POLLOUT if watching_out else 0))
            poller.poll()
            if channel.out_bytes:
                channel.flush()
            for frames in channel.read():
                if isinstance(frames, Oversized):  # the supervisor never sends one: nothing to answer
                    log.error("oversized message from the supervisor", extra={"reason": frames.reason})
                    continue
                kind = bytes(frames[0][:1])
                if kind == messages.TASK:
                    _run_task(channel, session, output_names, frames)
                elif kind == messages.BATCH:
                    _run_batch(channel, session, output_names, frames)
                elif kind == messages.PING:
                    channel.send([messages.PONG, bytes(frames[1])])
                elif kind == messages.QUIT:
                    _flush_all(channel, poller, fd)
                    return
                else:
                    log.warning("unknown message kind from supervisor", extra={"kind": kind.hex()})
    except PeerClosed:
        return  # the supervisor closed our channel: nothing left to serve


def _flush_all(channel: FrameStream, poller: Any, fd: int) -> None:
    poller.modify(fd, select.POLLOUT)
    while channel.out_bytes:
        poller.poll(1000)
        channel.flush()


def _feed_from(header: dict[str, Any], frames: list[Buffer]) -> dict[str, Any]:
    feed: dict[str, Any] = {}
    for spec, frame in zip(header["inputs"], frames):
        feed[spec["name"]] = _for_onnxruntime(spec["datatype"], decode_array(spec["datatype"], list(spec["shape"]), frame))
    return feed


def _for_onnxruntime(datatype: str, array: np.ndarray) -> Any:
    if datatype == "BYTES":  # onnxruntime wants str elements for tensor(string)
        return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array) if array.size else array
    if datatype == "BF16":  # uint16 bits, which onnxruntime must be told are bfloat16
        return bf16_input(array)
    return array


def _plain(value: Any) -> Any:
    return value if isinstance(value, BF16Array) else np.asarray(value)


def _run_task(channel: FrameStream, session: Any, output_names: list[str], frames: list[Buffer]) -> None:
    received_ns = time.monotonic_ns()
    cpu_start = time.process_time_ns()
    result_kind = messages.RESULT + bytes(frames[0][1:9])  # echoes the task id
    header: dict[str, Any] = {}
    try:
        header = unpack(frames[1])
        feed = _feed_from(header, frames[2:])
        wanted = header.get("outputs") or output_names
        prepared_ns = time.monotonic_ns()
        results = session.run(wanted, feed)
        computed_ns = time.monotonic_ns()
        specs = []
        payloads = []
        for name, value in zip(wanted, results):
            datatype, shape, payload = encode_array(_plain(value))
            specs.append({"name": name, "datatype": datatype, "shape": shape})
            payloads.append(payload)
        encoded_ns = time.monotonic_ns()
        meta = {
            "outputs": specs,
            "recv_ns": received_ns,
            "prep_us": (prepared_ns - received_ns) / 1000,
            "compute_us": (computed_ns - prepared_ns) / 1000,
            "encode_us": (encoded_ns - computed_ns) / 1000,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000,
            "send_ns": time.monotonic_ns(),
        }
        channel.send([result_kind, pack(meta), *payloads])
    except Exception as exc:  # every task gets exactly one answer, whatever onnxruntime raised
        meta = {
            "error": task_error(exc, header.get("inputs") or [], session.dynamic_inputs),
            "recv_ns": received_ns,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000,
            "send_ns": time.monotonic_ns(),
        }
        channel.send([result_kind, pack(meta)])


def _batch_feed(plan: dict[str, Any], frames: list[Buffer]) -> dict[str, Any]:
    """The batch's inputs: views of the joined frames, or each member's frames concatenated."""
    specs = plan["inputs"]
    if plan["joined"]:
        return _feed_from(plan, frames)
    feed: dict[str, Any] = {}
    for index, spec in enumerate(specs):
        parts = []
        for member, rows in enumerate(plan["rows"]):
            frame = frames[member * len(specs) + index]
            parts.append(decode_array(spec["datatype"], [rows, *spec["shape"][1:]], frame))
        feed[spec["name"]] = _for_onnxruntime(spec["datatype"], np.concatenate(parts, axis=0))
    return feed


def _split_outputs(results: list[Any], wanted: list[str], rows: list[int]) -> tuple[dict[str, Any], list[Any]]:
    """Output frames of a batch. Fixed-size outputs go whole, one frame each ("rows": the supervisor
    cuts each member's rows out of it by byte offset); BYTES elements have no fixed row size, so a batch
    with such an output is split here, member by member ("members")."""
    total = sum(rows)
    encoded = [encode_array(value) for value in results]
    if all(datatype != "BYTES" and shape[:1] == [total] for datatype, shape, _ in encoded):
        specs = [{"name": name, "datatype": datatype, "shape": shape} for name, (datatype, shape, _) in zip(wanted, encoded)]
        return {"layout": "rows", "outputs": specs}, [payload for _, _, payload in encoded]
    per_member: list[list[dict[str, Any]]] = []
    payloads: list[Any] = []
    start = 0
    for n in rows:
        member_specs = []
        for name, value in zip(wanted, results):
            part = value[start : start + n]
            datatype, shape, payload = encode_array(part if isinstance(part, BF16Array) else np.ascontiguousarray(part))
            member_specs.append({"name": name, "datatype": datatype, "shape": shape})
            payloads.append(payload)
        per_member.append(member_specs)
        start += n
    return {"layout": "members", "outputs": per_member}, payloads


def _run_batch(channel: FrameStream, session: Any, output_names: list[str], frames: list[Buffer]) -> None:
    """Several compatible tasks run once as one batch (rows concatenated along axis 0), answered in one
    message. Results equal running each task alone (the batch dimension is row-independent).

    In:  [b"B", plan {tasks, rows, inputs (the batch's specs), outputs, joined}, input frames] where
         joined = one frame per input holding every member's rows, else per member its input frames.
    Out: [b"S", meta, output frames] in meta["layout"]: "rows" = one frame per output for the whole
         batch, or "members" = per member its output frames (see _split_outputs).
    One message per batch, not per task: the supervisor's per-message cost is the throughput ceiling,
    and batching exists to cut it.
    """
    received_ns = time.monotonic_ns()
    cpu_start = time.process_time_ns()
    plan = unpack(frames[1])
    task_ids: list[int] = plan["tasks"]
    try:
        merged = _batch_feed(plan, frames[2:])
        wanted = plan["outputs"] or output_names
        prepared_ns = time.monotonic_ns()
        results = [_plain(value) for value in session.run(wanted, merged)]
        computed_ns = time.monotonic_ns()
        meta, payloads = _split_outputs(results, wanted, plan["rows"])
        meta.update(
            tasks=task_ids,
            recv_ns=received_ns,
            prep_us=(prepared_ns - received_ns) / 1000,
            compute_us=(computed_ns - prepared_ns) / 1000,
            encode_us=(time.monotonic_ns() - computed_ns) / 1000,
            cpu_us=(time.process_time_ns() - cpu_start) / 1000 / len(task_ids),
            send_ns=time.monotonic_ns(),
        )
        channel.send([messages.RESULTS, pack(meta), *payloads])
    except Exception as exc:  # every task of the batch gets an answer (the supervisor retries each alone)
        meta = {
            "tasks": task_ids,
            "error": task_error(exc, plan["inputs"], session.dynamic_inputs),
            "recv_ns": received_ns,
            "cpu_us": 0.0,
            "send_ns": time.monotonic_ns(),
        }
        channel.send([messages.RESULTS, pack(meta)])
