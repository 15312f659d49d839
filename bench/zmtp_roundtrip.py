"""Round trip of a tiny message through the daemon's own ZMTP engine (openinfer.wire.zmtp) over tcp,
NULL against CurveZMQ, from an unchanged libzmq DEALER: the wire layer alone, no supervisor behind it.

The server is a subprocess running a plain poll loop that echoes every message back through one
FrameStream per connection (SealedFrameStream + CurveServer for CURVE), as the front door does; the
client sends one message, waits for its echo, and repeats. Reports p50/p90/p99 per mechanism, runs
alternated so machine noise hits both alike.

    python bench/zmtp_roundtrip.py                 # NULL and CURVE, 3 alternated runs of 5000
    git show OLD:client/wire/zmtp.py > /tmp/zmtp_old.py
    python bench/zmtp_roundtrip.py --before /tmp/zmtp_old.py   # NULL: that file's FrameStream against this one
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import select
import socket
import statistics
import sys
import time

import zmq
from zmq.utils import z85

from openinfer.wire.zmtp import FrameStream, Limits, PeerClosed

PAYLOAD = [b"\x82\xa1v\x01\xa2id\x07" + b"h" * 40, b"\x00" * 256]  # a small header and a 256-byte tensor


def serve(port_queue: "multiprocessing.Queue[int]", curve: bool, module: str | None) -> None:
    stream_class = FrameStream
    if module is not None:  # another version of openinfer.wire.zmtp, for a before/after comparison
        spec = importlib.util.spec_from_file_location("zmtp_before", module)
        assert spec is not None and spec.loader is not None
        before = importlib.util.module_from_spec(spec)
        sys.modules["zmtp_before"] = before  # dataclasses look their module up there
        spec.loader.exec_module(before)
        stream_class = before.FrameStream
    keys = None
    if curve:
        from openinfer.daemon.frontdoor.curve import CurveServer, ServerKeys
        from openinfer.wire.sealed import SealedFrameStream

        public, secret = (z85.decode(k) for k in zmq.curve_keypair())
        keys = ServerKeys(public, secret)
        port_queue.put(-1)
        port_queue.put(public)  # type: ignore[arg-type]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port_queue.put(listener.getsockname()[1])
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    streams: dict[int, FrameStream] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                sock, _ = listener.accept()
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if keys is None:
                    stream = stream_class(sock, Limits(), handshake=True)
                else:
                    stream = SealedFrameStream(sock, Limits(), CurveServer(keys, lambda key: None))
                streams[sock.fileno()] = stream
                poller.register(sock, select.POLLIN)
                continue
            stream = streams[fd]
            try:
                for event in stream.read():
                    if isinstance(event, list):
                        stream.send(event)
                stream.flush()
            except PeerClosed:
                poller.unregister(fd)
                streams.pop(fd).close()


def measure(kind: str, count: int, before: str | None) -> list[float]:
    queue: "multiprocessing.Queue[int]" = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(queue, kind == "CURVE", before if kind == "NULL before" else None), daemon=True)
    server.start()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    try:
        first = queue.get(timeout=10)
        if first == -1:
            server_public = z85.encode(queue.get(timeout=10))  # type: ignore[arg-type]
            dealer.curve_serverkey = server_public
            dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
            first = queue.get(timeout=10)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{first}")
        for _ in range(200):  # warm up (and the handshake)
            dealer.send_multipart(PAYLOAD)
            dealer.recv_multipart()
        samples = []
        clock = time.perf_counter_ns
        for _ in range(count):
            start = clock()
            dealer.send_multipart(PAYLOAD)
            dealer.recv_multipart()
            samples.append((clock() - start) / 1000)
        return samples
    finally:
        dealer.close()
        context.term()
        server.kill()
        server.join()


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {statistics.median(ordered):6.1f} us  p90 {pick(0.9):6.1f} us  p99 {pick(0.99):6.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", metavar="ZMTP_PY", help="also measure NULL with the FrameStream of this file (an older client/wire/zmtp.py)")
    args = parser.parse_args()
    kinds = ["NULL before", "NULL", "CURVE"] if args.before else ["NULL", "CURVE"]
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    print(f"pid {os.getpid()}, {args.runs} alternated runs of {args.count} round trips, payload {sum(map(len, PAYLOAD))} bytes in 2 frames")
    for run in range(args.runs):
        for kind in kinds:
            samples = measure(kind, args.count, args.before)
            results[kind].extend(samples)
            print(f"run {run + 1} {kind:11}: {percentiles(samples)}")
    for kind in kinds:
        print(f"all   {kind:11}: {percentiles(results[kind])}")


if __name__ == "__main__":
    main()
