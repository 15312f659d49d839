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
