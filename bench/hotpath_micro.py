"""Hot-loop costs of the supervisor's per-request building blocks, and of cheaper ways to do the same.

    .venv/bin/python bench/hotpath_micro.py

One process, no daemon: pyzmq send/recv patterns on a real ipc:// ROUTER/DEALER pair with the sizes of a
tiny-model request, plus the daemon's own validation, codec and accounting functions. Figures are
best-of-5 per call in a hot loop, so they are lower bounds: in the running daemon every message wakes a
process on a busy 2-core machine and the same work costs ~2-3x more (compare `cpu_us_per_req` in
latency.json). Writes bench/results/hotpath_micro.json.
"""
from __future__ import annotations

import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Callable

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_info, write_json  # noqa: E402

N = 20_000
MORE = int(zmq.SNDMORE | zmq.NOBLOCK)  # plain ints: pyzmq's enum flags cost a few us per frame
LAST = NOBLOCK = int(zmq.NOBLOCK)


def per_call(fn: Callable[[], object], number: int = N) -> float:
    fn()
    return round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6, 2)


def per_batch(before: Callable[[], None], timed: Callable[[], None], after: Callable[[], None], count: int = N) -> float:
    """Time `timed` (count calls inside) between untimed `before` and `after`; best of 5."""
    best = float("inf")
    for _ in range(5):
        before()
        t0 = time.perf_counter()
        timed()
        best = min(best, time.perf_counter() - t0)
        after()
    return round(best / count * 1e6, 2)


def nothing() -> None:
    pass


def zmq_patterns(workdir: str) -> dict[str, float]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"w1")
    router.bind(f"ipc://{workdir}/micro.sock")
    dealer.connect(f"ipc://{workdir}/micro.sock")
    dealer.send(b"hello")
    router.recv_multipart()
    header, payload = b"h" * 85, b"p" * 256
    header_frame, payload_frame = zmq.Frame(header), zmq.Frame(payload)

    def fill() -> None:
        for _ in range(N):
            dealer.send_multipart([header, payload])
        time.sleep(0.3)

    def drain_dealer() -> None:
        time.sleep(0.3)
        while dealer.poll(0):
            dealer.recv_multipart()

    def recv_multipart_enum() -> None:
        for _ in range(N):
            router.recv_multipart(zmq.NOBLOCK, copy=False)

    def recv_loop_int() -> None:
        recv = router.recv
        for _ in range(N):
            frame = recv(NOBLOCK, copy=False)
            parts = [frame]
            while frame.more:
                frame = recv(NOBLOCK, copy=False)
                parts.append(frame)

    def send_multipart_enum() -> None:
        for _ in range(N):
            router.send_multipart([b"w1", b"T", b"12345678", header_frame, payload_frame], flags=zmq.NOBLOCK, copy=False)

    def send_loop_int() -> None:
        send = router.send
        for _ in range(N):
            send(b"w1", MORE, copy=False)
            send(b"T\0\0\0\0\0\0\0\x01", MORE, copy=False)  # kind + task id in one frame
            send(header_frame, MORE, copy=False)
            send(payload_frame, LAST, copy=False)

    out: dict[str, float] = {}
    out["recv: recv_multipart(zmq.NOBLOCK, copy=False), 3 frames"] = per_batch(fill, recv_multipart_enum, nothing)
    out["recv: recv(int flags, copy=False) loop on Frame.more"] = per_batch(fill, recv_loop_int, nothing)
    out["send: send_multipart(5 frames, flags=zmq.NOBLOCK, copy=False)"] = per_batch(nothing, send_multipart_enum, drain_dealer)
    out["send: 4 x send(int flags), kind+task id merged"] = per_batch(nothing, send_loop_int, drain_dealer)

    def empty_recv() -> None:
        try:
            router.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    events, pollin = int(zmq.EVENTS), int(zmq.POLLIN)
    out["drain end: recv on empty socket -> zmq.Again"] = per_call(empty_recv)
    out["drain end: getsockopt(EVENTS) & POLLIN"] = per_call(lambda: int(router.getsockopt(events)) & pollin)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(dealer, zmq.POLLIN)
    out["Poller.poll(0), 2 sockets"] = per_call(lambda: poller.poll(0))
    router.close()
    dealer.close()
    ctx.term()
    return out


def daemon_functions() -> dict[str, float]:
    from openinfer.wire.protocol import encode_infer_request, pack, unpack
    from openinfer.daemon.observability.accounting import Accountant
    from openinfer.daemon.frontdoor.validation import check_envelope, check_infer, decode_header, request_id_of

    class TinyModel:  # what check_infer reads of a ServedModel
        name = "tiny"
        input_by_name = {"x": {"name": "x", "datatype": "FP32", "shape": [-1, 64]}}
        output_names = frozenset({"y"})
        input_signatures: list[object] = []  # inputs already checked (check_infer's fast path)

    frames = encode_infer_request(123456789, "tiny", {"x": np.ones((1, 64), np.float32)}, timeout_ms=30000)
    header, payload = bytes(frames[0]), bytes(frames[1])
    model = TinyModel()

    def validate() -> None:
        h = decode_header(header)
        request_id_of(h)
        check_envelope(h, 2)
        check_infer(h, [payload], model, 1 << 26)  # type: ignore[arg-type]

    def validate_new_shape() -> None:
        model.input_signatures.clear()  # as for the first request of a shape: every check runs
        validate()

    meta = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64]}], "recv_ns": 1 << 50, "prep_us": 12.3, "compute_us": 20.1,
            "encode_us": 9.9, "cpu_us": 40.2, "send_ns": (1 << 50) + 99}
    raw_meta = pack(meta)
    timing = {"decode_us": 15.6, "queue_us": 2.2, "dispatch_us": 46.0, "prep_us": 12.0, "compute_us": 20.9, "encode_us": 10.0,
              "return_us": 63.1, "cpu_us": 42.4, "total_us": 175.0}
    reply = {"v": 1, "id": 123456789, "model": "tiny", "version": 1, "outputs": meta["outputs"], "timing": timing}
    accountant = Accountant()
    return {
        "validate: decode_header + check_envelope + check_infer": per_call(validate),
        "validate, a shape not seen before (check_infer's full checks)": per_call(validate_new_shape),
        "codec: unpack(worker meta)": per_call(lambda: unpack(raw_meta)),
        "codec: pack(reply header)": per_call(lambda: pack(reply)),
        "accounting: Accountant.record (model + client, 2 HDR histograms)": per_call(lambda: accountant.record("tiny", 1, "abcd", None, timing, 256, 256)),
    }


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="oi-micro-") as workdir:
        figures = {**zmq_patterns(workdir), **daemon_functions()}
    width = max(len(k) for k in figures)
    print(f"{'per call, hot loop (us)':<{width}}  us")
    for name, value in figures.items():
        print(f"{name:<{width}}  {value:6.2f}")
    write_json(RESULTS_DIR / "hotpath_micro.json", {"benchmark": "hotpath_micro", "unit": "us per call, best of 5", "figures": figures, "machine": machine_info()})
    print(f"\nwrote {RESULTS_DIR / 'hotpath_micro.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
