"""tcp:// only with CURVE: known client keys connect, unknown keys and plain clients get nothing."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import onnx_builders
from curve_setup import curve_env
from daemon_harness import wait_for, world_readable_dir
from openinfer.client import Client, OpenInferError
from repo_builder import make_world_readable

pytestmark = pytest.mark.live

X = np.ones((1, 64), np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_curve_keys_decide_who_connects(daemon_factory: Any, tmp_path: Path) -> None:
    repo = world_readable_dir("oi-curve-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    known_public, known_secret = zmq.curve_keypair()
    stranger = zmq.curve_keypair()
    env, server_public = curve_env(tmp_path, known_public, ["infer", "health", "stats"], '\n[[grant]]\nname = "local"\nlocal = true\noperations = ["health", "status", "stats"]\n')
    assert oct(Path(env["OPENINFER_SERVER_CURVE_SECRET_KEY_FILE"]).stat().st_mode & 0o777) == "0o600"
    address = f"tcp://127.0.0.1:{free_port()}"
    daemon = daemon_factory(repo, "--socket", address, env=env, wait=False, address=address)
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=(known_public, known_secret)) as client:
        wait_for(lambda: client.health()["ready"], 60, "the daemon ready over CURVE")
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=(known_public, known_secret)) as client:
        client.infer("tiny", {"x": X})  # a second connection with the same key...
        clients = client.stats()["clients"]
    # ...is the same client: accounted under its public key, not per connection.
    assert clients == {f"curve={known_public.decode()}": clients[f"curve={known_public.decode()}"]} and clients[f"curve={known_public.decode()}"]["requests"] == 2, clients
    with Client(address, timeout=1.5, curve_server_key=server_public, curve_keypair=stranger) as client:
        with pytest.raises(OpenInferError) as info:
            client.health()
        assert info.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    with Client(address, timeout=1.5) as plain:
        with pytest.raises(OpenInferError):
            plain.health()
    assert "connection refused: no grant matches this peer" in daemon.log_text()
    shutil.rmtree(repo, ignore_errors=True)


def test_curve_connections_are_capped_per_key_and_survive_an_oversized_request(daemon_factory: Any, tmp_path: Path) -> None:
    """The per-identity cap counts a CURVE client's connections under its key (known only after the
    handshake); a request over the size limit is answered RESOURCE_EXHAUSTED, its sealed frames skipped
    unopened, and the same connection serves the next request."""
    repo = world_readable_dir("oi-curve3-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    for path in repo.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    keypair = zmq.curve_keypair()
    env, server_public = curve_env(tmp_path, keypair[0], ["infer", "health", "stats"], OPENINFER_SERVER_MAX_CONNECTIONS_PER_IDENTITY="1", OPENINFER_SERVER_MAX_REQUEST_BYTES="4096")
    address = f"tcp://127.0.0.1:{free_port()}"
    daemon = daemon_factory(repo, "--socket", address, env=env, wait=False, address=address)
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=keypair) as first:
        wait_for(lambda: first.health()["ready"], 60, "the CURVE daemon to be ready", daemon=daemon)
        with Client(address, timeout=1.5, curve_server_key=server_public, curve_keypair=keypair) as second:
            with pytest.raises(OpenInferError):
                second.health()  # the key already has its one connection
        assert f"connection refused: curve={keypair[0].decode()} already has 1 connections" in daemon.log_text()
        for _ in range(2):
            with pytest.raises(OpenInferError) as info:
                first.infer("tiny", {"x": np.ones((1, 20000), np.float32)})  # 80 kB of tensor: over the limit
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert first.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
        assert first.stats()["clients"][f"curve={keypair[0].decode()}"]["requests"] == 4
    logged = [json.loads(raw) for raw in daemon.log_text().splitlines() if raw.startswith("{")]
    ends = [line for line in logged if line.get("msg") in ("connection closed", "connection dropped")]
    assert [line["peer"] for line in ends if line["peer"].startswith("curve=")] == [], ends  # only the refused second one ended
    shutil.rmtree(repo, ignore_errors=True)


def test_plain_tcp_is_refused_without_the_insecure_flag(daemon_factory: Any, tmp_path: Path) -> None:
    repo = world_readable_dir("oi-curve2-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    address = f"tcp://127.0.0.1:{free_port()}"
    daemon = daemon_factory(repo, "--socket", address, wait=False, address=address)
    assert daemon.process.wait(30) == 1
    assert "needs CURVE keys" in daemon.log_text()
    shutil.rmtree(repo, ignore_errors=True)


def test_insecure_tcp_serves_anonymous_peers_only_what_the_policy_grants_them(daemon_factory: Any, tmp_path: Path) -> None:
    """Plain tcp:// peers have no identity: they match only `anonymous = true` grants (the shipped
    policy gives them infer and the read operations, never stats, status or reload)."""
    repo = world_readable_dir("oi-insecure-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    for path in repo.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    address = f"tcp://127.0.0.1:{free_port()}"
    daemon = daemon_factory(repo, "--insecure-tcp", address=address)
    with Client(address, timeout=10) as client:
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
        with pytest.raises(OpenInferError) as denied:
            client.stats()
        assert denied.value.code == "PERMISSION_DENIED"
    # A client written from PROTOCOL.md 17.1 asks for a lease first: the answer must tell it to stop asking.
    with zmq.Context() as context, context.socket(zmq.DEALER) as raw:
        raw.connect(address)
        raw.send(msgpack.packb({"v": 1, "id": 1, "op": "lease", "model": "tiny"}))
        assert raw.poll(10_000), "no answer to lease"
        error = msgpack.unpackb(raw.recv())["error"]
        raw.setsockopt(zmq.LINGER, 0)
    assert error["code"] == "UNAVAILABLE" and error["details"] == {"direct": "off"}, error
    shutil.rmtree(repo, ignore_errors=True)
    assert daemon.process.poll() is None


def test_the_public_key_file_is_optional_as_documented(daemon_factory: Any, tmp_path: Path) -> None:
    """PROTOCOL.md 2.2: the daemon derives its public key from the secret one and checks `PATH.pub` only
    when it is there (round 65: the settings refused to start without it)."""
    repo = world_readable_dir("oi-curve-nopub-")
    onnx_builders.matmul_model(repo / "tiny" / "1" / "model.onnx")
    make_world_readable(repo)
    known = zmq.curve_keypair()
    env, server_public = curve_env(tmp_path, known[0], ["infer", "health"])
    Path(env["OPENINFER_SERVER_CURVE_SECRET_KEY_FILE"] + ".pub").unlink()
    address = f"tcp://127.0.0.1:{free_port()}"
    daemon = daemon_factory(repo, "--socket", address, env=env, wait=False, address=address)
    with Client(address, timeout=60, curve_server_key=server_public, curve_keypair=known) as client:
        wait_for(lambda: client.health()["ready"], 60, "the daemon ready over CURVE", daemon=daemon)
        assert client.infer("tiny", {"x": X}).outputs["y"].shape == (1, 64)
    shutil.rmtree(repo, ignore_errors=True)
