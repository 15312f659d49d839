"""An admitted CURVE client beside a flood of junk hand-shakes from many addresses (attacker round 65).

    sudo .venv/bin/python bench/preauth_flood.py               # ~2 min: 3 interleaved rounds
    sudo .venv/bin/python bench/preauth_flood.py --hosts 40 --rounds 2
    .venv/bin/python bench/preauth_flood.py --plot-only bench/results/preauth_flood.json

Runs itself in a network namespace of its own (`unshare -n`, root): there 10.7.0.0/16 is on the loopback
device, so the daemon (10.7.0.1), the admitted client (10.7.200.2) and the flood (10.7.1.x, 10.7.2.x ...)
are ordinary, distinct hosts, as on a network - every loopback address is one host to the daemon. One
sandboxed daemon serves `examples/models/tiny` over tcp:// with CURVE; the client, whose key the policy
admits, connects first and alternates `health` and `infer` for `--seconds`; meanwhile (or not: the
control, in the same round) the flood keeps `--connections` connections open from `--hosts` addresses,
each a CURVE greeting and a HELLO that is not one (no key needed), reopening each as the daemon closes it.
Reports the client's p50, p99 and worst wait with and without the flood (their ratio), and how many
connections the flood made; medians over rounds. Writes bench/results/preauth_flood.json and .png;
reports, never asserts.

Before the fix (every pre-auth host its own identity in the daemon's fair turns, each protocol error a log
line), 300 hosts held the client's requests up to 2.4-3.7 s (p99 1.1-2.3 s against 4 ms alone).
"""
from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import add_output_arguments, machine_info, median_of, pyplot, redrawn, world_readable_copy, write_json  # noqa: E402

DAEMON_HOST, CLIENT_HOST = "10.7.0.1", "10.7.200.2"
IN_NAMESPACE = "OPENINFER_BENCH_NETNS"
GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"CURVE".ljust(20, b"\0") + b"\0" + bytes(31)
JUNK_HELLO = b"\x04\x06\x05HELLO"  # a HELLO command of 6 bytes: CURVE's is 200


def flood_host(index: int, hosts: int) -> str:
    n = index % hosts
    return f"10.7.{1 + n // 250}.{1 + n % 250}"


def flood(port: int, hosts: int, connections: int, seconds: float) -> int:
    """Junk hand-shakes from `hosts` addresses, `connections` open at once, for `seconds`; how many made."""
    selector = selectors.DefaultSelector()
    made = 0

    def open_one() -> None:
        nonlocal made
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((flood_host(made, hosts), 0))
        made += 1
        try:
            sock.connect((DAEMON_HOST, port))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return
        selector.register(sock, selectors.EVENT_WRITE, False)

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        while len(selector.get_map()) < connections:
            open_one()
        for key, events in selector.select(0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if events & selectors.EVENT_WRITE and not key.data:
                    sock.send(GREETING + JUNK_HELLO)
                    selector.modify(sock, selectors.EVENT_READ, True)
                elif events & selectors.EVENT_READ and sock.recv(65536):
                    continue
                else:
                    raise ConnectionResetError
            except OSError:
                selector.unregister(sock)
                sock.close()
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return made


def client_waits(address: str, server_public: bytes, keypair: tuple[bytes, bytes], seconds: float, ready: Any) -> list[float]:
    """The admitted client: connected and answered once, then `health` and `infer` in turn; each wait in ms."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, keypair[0], keypair[1]
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{CLIENT_HOST}:0;{address[len('tcp://'):]}")
    x = np.ones((1, 64), np.float32).tobytes()
    requests = [[msgpack.packb({"v": 1, "id": 0, "op": "health"})],
                [msgpack.packb({"v": 1, "id": 0, "op": "infer", "model": "tiny", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]}), x]]
    waits: list[float] = []
    try:
        sock.send_multipart(requests[0])
        assert sock.poll(60_000), "the admitted client got no first answer"
        sock.recv_multipart()
        ready()
        end = time.monotonic() + seconds
        turn = 0
        while time.monotonic() < end:
            started = time.perf_counter()
            sock.send_multipart(requests[turn % 2])
            if not sock.poll(10_000):
                waits.append(10_000.0)
                break
            sock.recv_multipart()
            waits.append((time.perf_counter() - started) * 1000)
            turn += 1
    finally:
        sock.close()
        context.term()
    return waits


def summary(waits: list[float]) -> dict[str, float]:
    ordered = sorted(waits)
    return {"requests": len(ordered), "p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(ordered[int(len(ordered) * 0.99)], 2), "max_ms": round(ordered[-1], 2)}


def one_round(args: argparse.Namespace, daemon_address: str, server_public: bytes, keypair: tuple[bytes, bytes], with_flood: bool) -> dict[str, Any]:
    import threading

    started = threading.Event()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(waits=client_waits(daemon_address, server_public, keypair, args.seconds, started.set)))
    thread.start()
    assert started.wait(60), "the admitted client never got its first answer"
    port = int(daemon_address.rsplit(":", 1)[1])
    made = flood(port, args.hosts, args.connections, args.seconds) if with_flood else 0
    thread.join()
    return {**summary(result["waits"]), "flood_connections": made}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{DAEMON_HOST}/16", "dev", "lo"], check=True)
    work = Path(tempfile.mkdtemp(prefix="oi-preauth-"))
    key_file = work / "server.key"
    subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", "keygen", str(key_file)], check=True, capture_output=True)
    server_public = Path(f"{key_file}.pub").read_text().strip().encode()
    keypair = zmq.curve_keypair()
    policy = work / "access.toml"
    policy.write_text(f'[[grant]]\nname = "client"\ncurve_keys = ["{keypair[0].decode()}"]\noperations = ["infer", "health"]\n')
    models = world_readable_copy(["tiny"])
    address = f"tcp://{DAEMON_HOST}:47790"
    env = {**os.environ, "OPENINFER_SERVER_CURVE_SECRET_KEY_FILE": str(key_file), "OPENINFER_SERVER_ACCESS_POLICY": str(policy),
           "OPENINFER_SERVER_RUNTIME_DIR": str(work / "run"), "OPENINFER_SERVER_CACHE_DIR": str(work / "cache"), "OPENINFER_POOL_WORKERS": "1"}
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "openinfer.daemon.cli", "serve", "--models", str(models), "--socket", address], env=env, stdout=log, stderr=subprocess.STDOUT)
    runs: dict[str, list[dict[str, Any]]] = {"alone": [], "flood": []}
    try:
        for index in range(args.rounds):  # interleaved, the order reversed every other round
            order = ["alone", "flood"] if index % 2 == 0 else ["flood", "alone"]
            for label in order:
                runs[label].append(one_round(args, address, server_public, keypair, label == "flood"))
                print(f"round {index + 1} {label}: {runs[label][-1]}", flush=True)
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
    figures = {label: {key: median_of(run[key] for run in values) for key in values[0]} for label, values in runs.items()}
    ratios = {key: round(figures["flood"][key] / figures["alone"][key], 2) for key in ("p50_ms", "p99_ms", "max_ms") if figures["alone"][key]}
    log_bytes = (work / "daemon.log").stat().st_size
    return {"config": {"hosts": args.hosts, "connections": args.connections, "seconds": args.seconds, "rounds": args.rounds, "model": "examples/models/tiny, 1 worker, sandboxed, tcp:// CURVE"},
            "figures": figures, "flood_over_alone": ratios, "daemon_log_bytes": log_bytes, "runs": runs, "machine": machine_info()}


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figures = results["figures"]
    keys = ["p50_ms", "p99_ms", "max_ms"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, label in ((-0.2, "alone"), (0.2, "flood")):
        ax.bar([i + offset for i in range(len(keys))], [figures[label][k] for k in keys], width=0.4, label=label)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yscale("log")
    ax.set_ylabel("admitted client's wait (ms, log)")
    config = results["config"]
    ax.set_title(f"junk CURVE hand-shakes from {config['hosts']} hosts ({config['connections']} open)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=300)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    add_output_arguments(parser, BENCH / "results" / "preauth_flood.json")
    args = parser.parse_args()
    if redrawn(args, plot):
        return
    if os.environ.get(IN_NAMESPACE) != "1":
        if os.geteuid() != 0:
            sys.exit("preauth_flood.py needs root: it runs in a network namespace of its own (unshare -n)")
        os.execvpe("unshare", ["unshare", "-n", sys.executable, *sys.argv], {**os.environ, IN_NAMESPACE: "1"})
    results = measure(args)
    write_json(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    print(f"alone {results['figures']['alone']}\nflood {results['figures']['flood']}\nflood/alone {results['flood_over_alone']}")


if __name__ == "__main__":
    main()
