"""The worker's serving loop: a closed set of operations (TASK, PING, QUIT); nothing else is executed."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import zmq

from openinfer.client.protocol import pack, unpack
from openinfer.client.tensors import decode_array, encode_array

from . import messages
from .session import error_code_for

log = logging.getLogger("openinfer.worker")


def serve(socket: zmq.Socket, session: Any, output_names: list[str]) -> None:  # type: ignore[type-arg]
    """Run tasks until QUIT. Returns normally only on QUIT; the supervisor kills us otherwise."""
    while True:
        frames = socket.recv_multipart(copy=False)
        kind = frames[0].bytes[:1]
        if kind == messages.TASK:
            _run_task(socket, session, output_names, frames)
        elif kind == messages.BATCH:
            _run_batch(socket, session, output_names, frames)
        elif kind == messages.PING:
            socket.send_multipart([messages.PONG, frames[1].bytes])
        elif kind == messages.QUIT:
            return
        else:
            log.warning("unknown message kind from supervisor", extra={"kind": kind.hex()})


def _feed_from(header: dict[str, Any], frames: list[zmq.Frame]) -> dict[str, np.ndarray]:
    feed: dict[str, np.ndarray] = {}
    for spec, frame in zip(header["inputs"], frames):
        array = decode_array(spec["datatype"], list(spec["shape"]), frame.buffer)
        if spec["datatype"] == "BYTES":  # onnxruntime wants str elements for tensor(string)
            array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array) if array.size else array
        feed[spec["name"]] = array
    return feed


def _run_task(socket: zmq.Socket, session: Any, output_names: list[str], frames: list[zmq.Frame]) -> None:  # type: ignore[type-arg]
    received_ns = time.monotonic_ns()
    cpu_start = time.process_time_ns()
    result_kind = messages.RESULT + frames[0].bytes[1:]  # echoes the task id
    try:
        header = unpack(frames[1].buffer)
        feed = _feed_from(header, frames[2:])
        wanted = header.get("outputs") or output_names
        prepared_ns = time.monotonic_ns()
        results = session.run(wanted, feed)
        computed_ns = time.monotonic_ns()
        specs = []
        payloads = []
        for name, value in zip(wanted, results):
            datatype, shape, payload = encode_array(np.asarray(value))
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
        socket.send_multipart([result_kind, pack(meta), *payloads], copy=False)
    except Exception as exc:  # every task gets exactly one answer, whatever onnxruntime raised
        meta = {
            "error": {"code": error_code_for(exc), "message": f"{type(exc).__name__}: {exc}"[:2000]},
            "recv_ns": received_ns,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000,
            "send_ns": time.monotonic_ns(),
        }
        socket.send_multipart([result_kind, pack(meta)])


def _run_batch(socket: zmq.Socket, session: Any, output_names: list[str], frames: list[zmq.Frame]) -> None:  # type: ignore[type-arg]
    """Several compatible tasks: concatenate along axis 0, run once, split, answer all in one message.

    Frames in: [b"B", {"tasks": [id...], "frames": [n...]}, then per task its header and data frames].
    Frames out: [b"S", meta, then per task its output frames]; meta has the batch's shared timings and
    per task its output specs and encode time. Results equal running each task alone (row-independent
    batch dimension). One message per batch, not per task: the supervisor's per-message cost is the
    throughput ceiling, and batching exists to cut it.
    """
    received_ns = time.monotonic_ns()
    cpu_start = time.process_time_ns()
    plan = unpack(frames[1].buffer)
    task_ids: list[int] = plan["tasks"]
    try:
        headers: list[dict[str, Any]] = []
        feeds: list[dict[str, np.ndarray]] = []
        offset = 2
        for count in plan["frames"]:
            header = unpack(frames[offset].buffer)
            headers.append(header)
            feeds.append(_feed_from(header, frames[offset + 1 : offset + count]))
            offset += count
        rows = [next(iter(feed.values())).shape[0] for feed in feeds]
        merged = {name: np.concatenate([feed[name] for feed in feeds], axis=0) for name in feeds[0]}
        wanted = headers[0].get("outputs") or output_names
        prepared_ns = time.monotonic_ns()
        results = [np.asarray(value) for value in session.run(wanted, merged)]
        computed_ns = time.monotonic_ns()
        specs: list[list[dict[str, Any]]] = []
        encode_us: list[float] = []
        payloads: list[Any] = []
        start = 0
        for n in rows:
            encode_start = time.monotonic_ns()
            task_specs = []
            for name, value in zip(wanted, results):
                datatype, shape, payload = encode_array(np.ascontiguousarray(value[start : start + n]))
                task_specs.append({"name": name, "datatype": datatype, "shape": shape})
                payloads.append(payload)
            specs.append(task_specs)
            encode_us.append((time.monotonic_ns() - encode_start) / 1000)
            start += n
        meta = {
            "tasks": task_ids,
            "outputs": specs,
            "encode_us": encode_us,
            "recv_ns": received_ns,
            "prep_us": (prepared_ns - received_ns) / 1000,
            "compute_us": (computed_ns - prepared_ns) / 1000,
            "cpu_us": (time.process_time_ns() - cpu_start) / 1000 / len(task_ids),
            "send_ns": time.monotonic_ns(),
        }
        socket.send_multipart([messages.RESULTS, pack(meta), *payloads], copy=False)
    except Exception as exc:  # every task of the batch gets an answer (the supervisor retries each alone)
        meta = {
            "tasks": task_ids,
            "error": {"code": error_code_for(exc), "message": f"{type(exc).__name__}: {exc}"[:2000]},
            "recv_ns": received_ns,
            "cpu_us": 0.0,
            "send_ns": time.monotonic_ns(),
        }
        socket.send_multipart([messages.RESULTS, pack(meta)])
