"""The sandbox of the daemon's real workers, checked from outside (/proc, `openinfer status --json`) and
attacked from inside (workers booted by the daemon's own spawner and boot code, whose serve loop is
swapped for one that obeys the test).

tests/sandbox/ covers policies and hardening calls one by one in a worker-like process of its own; here
the subject is what the daemon actually builds: its settings, its spawner's environment, its boot order
(uid drop included), both policies stacked.
"""
from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import select

from openinfer.wire.zmtp import FrameStream, Limits

import onnx_builders
from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon, wait_for, world_readable_dir
from openinfer.wire.protocol import unpack
from repo_builder import make_world_readable

pytestmark = pytest.mark.live

MiB = 1024 * 1024
DEFAULT_LIMIT_MB = 1536  # OPENINFER_SANDBOX_MEMORY_LIMIT_MB of the private daemon
CAPPED_LIMIT_MB = 768  # the `capped` model's own config.toml
SEED = 7
X = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(1, 64)


def expected_y(x: np.ndarray) -> np.ndarray:
    """What onnx_builders.matmul_model(seed=SEED) computes, redone with numpy."""
    rng = np.random.default_rng(SEED)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    bias = rng.standard_normal((64,)).astype(np.float32)
    return x @ weight + bias


def proc_status(path: str) -> dict[str, str]:
    fields = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def address_space_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            soft, hard = line[len("Max address space"):].split()[:2]
            return int(soft), int(hard)
    raise AssertionError(f"no address-space line in /proc/{pid}/limits")


# -- a private daemon ---------------------------------------------------------------------------------
@dataclass
class LiveDaemon:
    running: RunningDaemon
    models: Path

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "openinfer.daemon.cli", "status", "--json", "--socket", self.running.address],
            capture_output=True, text=True, timeout=30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    def workers(self) -> list[dict[str, Any]]:
        workers = [w for w in self.status()["workers"] if w["state"] in ("ready", "busy")]
        assert {w["model"] for w in workers} == {"good", "capped"} and len(workers) == 3, workers
        return workers


@pytest.fixture(scope="module")
def live() -> Iterator[LiveDaemon]:
    root = world_readable_dir("oi-live-sandbox-")
    onnx_builders.matmul_model(root / "good" / "1" / "model.onnx", seed=SEED)
    (root / "good" / "config.toml").write_text("workers = 2\nintra_op_threads = 2\n")
    onnx_builders.matmul_model(root / "capped" / "1" / "model.onnx", seed=SEED)
    (root / "capped" / "config.toml").write_text(f"memory_limit_mb = {CAPPED_LIMIT_MB}\n")
    make_world_readable(root)
    running = start_daemon(root, env={"OPENINFER_SANDBOX_MEMORY_LIMIT_MB": str(DEFAULT_LIMIT_MB)})
    try:
        with running.client(timeout=30) as client:  # every worker has served once before we look
            for _ in range(4):
                np.testing.assert_allclose(client.infer("good", {"x": X}).outputs["y"], expected_y(X), rtol=1e-4, atol=1e-4)
            client.infer("capped", {"x": X})
        yield LiveDaemon(running, root)
    finally:
        running.stop()
        cleanup_workdir(running)
        shutil.rmtree(root, ignore_errors=True)


# -- from outside -------------------------------------------------------------------------------------
def test_every_thread_of_every_worker_is_filtered_unprivileged_and_synchronised(live: LiveDaemon) -> None:
    for worker in live.workers():
        pid = worker["pid"]
        tids = os.listdir(f"/proc/{pid}/task")
        # main and onnxruntime's pool (2 threads for `good`): "every thread" means something
        assert len(tids) >= (2 if worker["model"] == "good" else 1), (worker["model"], tids)
        filters = set()
        for tid in tids:
            status = proc_status(f"/proc/{pid}/task/{tid}/status")
            where = (worker["model"], pid, tid, status["Name"])
            assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", where
            assert all(int(uid) != 0 for uid in status["Uid"].split()), (where, status["Uid"])
            assert all(int(gid) != 0 for gid in status["Gid"].split()), (where, status["Gid"])
            assert status["CapEff"] == status["CapPrm"] == "0000000000000000", where
            filters.add(int(status["Seccomp_filters"]))
        # TSYNC: the serve filter reached every thread, stacked on the boot filter.
        assert len(filters) == 1 and filters.pop() >= 2, (worker["model"], filters)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            assert proc_status(f"/proc/{pid}/status")["Uid"].split() == [str(nobody.pw_uid)] * 4


def test_workers_live_in_the_namespaces_status_claims(live: LiveDaemon) -> None:
    supervisor = live.running.process.pid
    for worker in live.workers():
        pid, entered = worker["pid"], worker["sandbox"]["namespaces_entered"]
        assert isinstance(entered, list) and set(entered) <= {"net", "ipc", "user"}, entered
        for ns in ("net", "ipc"):
            separate = os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/{supervisor}/ns/{ns}")
            assert separate == (ns in entered), (worker["model"], ns, entered)
        if "net" in entered:  # a fresh network namespace: loopback only, and no route anywhere
            interfaces = {line.split(":")[0].strip() for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]}
            assert interfaces == {"lo"}, interfaces
            assert Path(f"/proc/{pid}/net/route").read_text().splitlines()[1:] == []


def test_status_json_reports_each_workers_sandbox_truthfully(live: LiveDaemon) -> None:
    limits = {"good": DEFAULT_LIMIT_MB * MiB, "capped": CAPPED_LIMIT_MB * MiB}
    for worker in live.workers():
        pid, sandbox = worker["pid"], worker["sandbox"]
        for key in ("seccomp_mode", "policy", "uid", "landlock_abi", "memory_limit_bytes", "namespaces_entered"):
            assert key in sandbox, (key, sorted(sandbox))
        status = proc_status(f"/proc/{pid}/status")
        assert sandbox["pid"] == pid
        assert sandbox["seccomp_mode"] == 2 and sandbox["all_threads_filtered"] is True
        assert sandbox["seccomp_filters"] == int(status["Seccomp_filters"])  # boot + serve, as the kernel counts
        assert sandbox["policy"] == "worker" and sandbox["boot_policy"] == "boot"
        assert sandbox["uid"] == [int(v) for v in status["Uid"].split()] and 0 not in sandbox["uid"]
        assert isinstance(sandbox["landlock_abi"], int) and 0 <= sandbox["landlock_abi"] <= sandbox["landlock_abi_available"]
        if sandbox["landlock_abi_available"]:
            assert sandbox["landlock_abi"] >= 1, "the kernel offers Landlock but the worker did not apply it"
        assert sandbox["memory_limit_bytes"] == limits[worker["model"]], worker["model"]
        assert sandbox["rlimits"]["as"] == {"soft": limits[worker["model"]], "hard": limits[worker["model"]]}


def test_rlimit_as_is_the_configured_memory_limit(live: LiveDaemon) -> None:
    """The daemon-wide default (env) for `good`, the model's config.toml for `capped`."""
    limits = {"good": DEFAULT_LIMIT_MB * MiB, "capped": CAPPED_LIMIT_MB * MiB}
    for worker in live.workers():
        assert address_space_limit(worker["pid"]) == (limits[worker["model"]],) * 2, worker["model"]


def _cat_as(uid: int, gid: int, path: str) -> subprocess.CompletedProcess[bytes]:
    switch: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if os.geteuid() == 0 else {}
    return subprocess.run(["/bin/cat", path], capture_output=True, timeout=10, env={"LC_ALL": "C"}, **switch)


def test_workers_are_not_dumpable(live: LiveDaemon) -> None:
    """Not dumpable: the kernel gives /proc/PID to root and refuses /proc/PID/environ even to the same uid.
    Control: a plain process of the same uid is readable, so the check can tell the difference."""
    worker = live.workers()[0]
    status = proc_status(f"/proc/{worker['pid']}/status")
    uid, gid = int(status["Uid"].split()[0]), int(status["Gid"].split()[0])
    switch: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if os.geteuid() == 0 else {}
    control = subprocess.Popen(["/bin/sleep", "30"], env={"CONTROL": "1"}, **switch)
    try:
        # Root owns /proc/PID from the uid switch until the exec.
        wait_for(lambda: os.stat(f"/proc/{control.pid}/environ").st_uid == uid, 10, "the control process to exec as the worker's uid")
        readable = _cat_as(uid, gid, f"/proc/{control.pid}/environ")
        assert readable.returncode == 0 and b"CONTROL=1" in readable.stdout, readable
    finally:
        control.kill()
        control.wait()
    for worker in live.workers():
        pid = worker["pid"]
        assert os.stat(f"/proc/{pid}/environ").st_uid == 0 != uid, "a dumpable process owns its /proc entries"
        refused = _cat_as(uid, gid, f"/proc/{pid}/environ")
        assert refused.returncode != 0 and b"Permission denied" in refused.stderr, refused


# -- from inside: the daemon's own spawner and boot code, serving the test instead of the daemon ------
# Runs in the worker after the spawner's shim moved the status pipe to fd 3 and before boot.main: so it is
# imported with everything else, before any policy. It replaces serve(), the last step of the boot order.
ATTACK_PRELUDE = r'''
import ctypes, errno, os, socket
import numpy as np
import openinfer.daemon.worker.serve as _serve_module
_libc = ctypes.CDLL(None, use_errno=True)
_get_errno = ctypes.get_errno
_X = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(1, 64)

def _name(exc):
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))

def _file_write():
    try:  # /tmp: DAC would allow it. Creating the file is the escape, whatever a write would do after.
        f = open("/tmp/openinfer-attack-%d" % os.getpid(), "w")
    except OSError as exc:
        return _name(exc)
    f.close()
    return "ok"

def _file_read():
    try:
        with open("/etc/passwd", "rb") as f:  # world-readable: only the sandbox says no
            f.read()
    except OSError as exc:
        return _name(exc)
    return "ok"

def _socket(family):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return _name(exc)
    s.close()
    return "ok"

def _execve():
    try:
        os.execv("/bin/true", ["true"])
    except OSError as exc:
        return _name(exc)
    return "ok"

def _fork():
    try:
        pid = os.fork()
    except OSError as exc:
        return _name(exc)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return "ok"

def _ptrace():
    if _libc.ptrace(0, 0, None, None) == -1:  # PTRACE_TRACEME
        return errno.errorcode.get(_get_errno(), "?")
    return "ok"

_ATTACKS = {
    "file_write": _file_write,
    "file_read": _file_read,
    "unix_socket": lambda: _socket(socket.AF_UNIX),
    "inet_socket": lambda: _socket(socket.AF_INET),
    "inet6_socket": lambda: _socket(socket.AF_INET6),
    "execve": _execve,
    "fork": _fork,
    "ptrace": _ptrace,
}

def _obey(channel, session, output_names, *_):
    import select
    poller = select.poll()
    poller.register(channel.sock.fileno(), select.POLLIN)
    while True:
        poller.poll()
        for frames in channel.read():
            frames = [bytes(f) for f in frames]
            if frames[0] == b"infer":
                y = getattr(session, "session", session).run(None, {"x": _X})[0]
                channel.send([b"ok", np.ascontiguousarray(y, dtype=np.float32).tobytes()])
            elif frames[0] == b"attack":
                channel.send([b"ok", _ATTACKS[frames[1].decode()]().encode()])
            elif frames[0] == b"quit":
                return

_serve_module.serve = _obey
'''
BOOT_IMPORT = "from openinfer.daemon.worker.boot import main\n"
FATAL_ATTACKS = ["inet_socket", "inet6_socket", "unix_socket", "execve", "fork", "ptrace"]
SOFT_ATTACKS = ["file_write", "file_read"]
BLOCKED = {"SIGSYS", *errno.errorcode.values()}


@dataclass
class AttackWorker:
    name: str
    channel: Any  # our end of the worker's socketpair (openinfer.wire.zmtp.FrameStream)
    spawned: Any
    sandbox: dict[str, Any] = field(default_factory=dict)
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return int(self.spawned.pid)

    def drain_stderr(self) -> str:
        while True:
            try:
                chunk = os.read(self.spawned.stderr_fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self.stderr += chunk
        return self.stderr.decode(errors="replace")

    def send(self, frames: list[bytes]) -> None:
        self.channel.send(frames)
        while self.channel.out_bytes:
            select.select([], [self.channel.sock], [], 1)
            self.channel.flush()

    def receive(self, timeout_s: float) -> list[bytes] | None:
        """The worker's next message, or None once it has exited (no message can come any more)."""
        from openinfer.wire.zmtp import PeerClosed

        deadline = time.monotonic() + timeout_s
        pending = getattr(self, "_pending", [])
        self._pending = pending
        while time.monotonic() < deadline:
            if pending:
                return [bytes(f) for f in pending.pop(0)]
            if select.select([self.channel.sock], [], [], 0.05)[0]:
                try:
                    pending.extend(self.channel.read())
                    continue
                except PeerClosed:
                    return None
            if self.spawned.process.poll() is not None and not select.select([self.channel.sock], [], [], 0.1)[0]:
                return None
        raise AssertionError(f"{self.name}: no message and no exit within {timeout_s} s\n{self.drain_stderr()[-3000:]}")

    def boot(self) -> None:
        """Play the supervisor's side of the boot handshake: HELLO -> ACK -> READY."""
        from openinfer.daemon.worker import messages

        hello = self.receive(90)
        assert hello is not None and hello[0] == messages.HELLO, (hello, self.spawned.read_status(), self.drain_stderr()[-3000:])
        self.send([messages.ACK])
        ready = self.receive(30)
        assert ready is not None and ready[0] == messages.READY, (ready, self.spawned.read_status(), self.drain_stderr()[-3000:])
        self.sandbox = unpack(ready[1])

    def infer(self) -> np.ndarray:
        self.send([b"infer"])
        reply = self.receive(30)
        assert reply is not None and reply[0] == b"ok", (reply, self.drain_stderr()[-3000:])
        return np.frombuffer(reply[1], dtype=np.float32).reshape(1, 64)

    def attack(self, name: str) -> str:
        """The errno name the attempt failed with, "ok" if it worked, or how the worker died."""
        self.send([b"attack", name.encode()])
        reply = self.receive(30)
        if reply is not None:
            assert reply[0] == b"ok", reply
            return reply[1].decode()
        code = self.spawned.process.wait(10)
        return "SIGSYS" if code == -signal.SIGSYS else f"exit {code}"


def _attack_boot_config(worker_id: int, model_path: Path) -> Any:
    """What WorkerPool.boot_config gives a worker of this model under the daemon's default settings."""
    from openinfer.daemon.workerpool.pool import worker_read_paths
    from openinfer.daemon.config.settings import Settings
    from openinfer.daemon.worker.bootconfig import WorkerBootConfig, WorkerSandboxConfig

    sb = Settings().sandbox
    uid = gid = None
    if os.geteuid() == 0:
        entry = pwd.getpwnam(sb.worker_user)
        uid, gid = entry.pw_uid, entry.pw_gid
    return WorkerBootConfig(
        worker_id=worker_id, model="attack", version=1, model_path=str(model_path),
        intra_op_threads=2, supervisor_pid=os.getpid(), log_level="info",
        repository=str(model_path.parent.parent), work_dir=str(model_path.parent.parent / "cwd"),
        sandbox=WorkerSandboxConfig(
            enabled=True, boot_policy=sb.boot_policy, serve_policy=sb.serve_policy, uid=uid, gid=gid,
            memory_limit_bytes=sb.memory_limit_mb * MiB, max_open_files=sb.max_open_files,
            landlock=sb.landlock, namespaces=sb.namespaces, read_paths=worker_read_paths(),
        ),
    )


@pytest.fixture(scope="module")
def attack_workers() -> Iterator[dict[str, AttackWorker]]:
    """One freshly booted worker per fatal attack plus one for the soft ones, all booting at once."""
    from openinfer.daemon.workerpool import spawner

    assert BOOT_IMPORT in spawner._SHIM, "the spawner's shim changed: update ATTACK_PRELUDE's insertion point"
    shim = spawner._SHIM.replace(BOOT_IMPORT, ATTACK_PRELUDE + BOOT_IMPORT)
    root = world_readable_dir("oi-attack-")
    model_path = onnx_builders.matmul_model(root / "model" / "model.onnx", seed=SEED)
    (root / "cwd").mkdir()  # the empty directory the workers run in (the pool's runtime_dir.WORK_DIR)
    make_world_readable(root)
    workers: dict[str, AttackWorker] = {}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(spawner, "_SHIM", shim)
            for worker_id, name in enumerate(["soft", *FATAL_ATTACKS], start=1):
                spawned = spawner.spawn_worker(_attack_boot_config(worker_id, model_path))
                channel = FrameStream(spawned.channel, Limits(frames=1 << 16, first_frame=1 << 30, message_bytes=1 << 40))
                workers[name] = AttackWorker(name, channel, spawned)
        for worker in workers.values():
            worker.boot()
        yield workers
    finally:
        for worker in workers.values():
            if worker.spawned.process.poll() is None:
                worker.spawned.process.kill()
            worker.spawned.process.wait(10)
            worker.drain_stderr()
            worker.spawned.close()
        shutil.rmtree(root, ignore_errors=True)


def test_attack_workers_are_sandboxed_like_the_daemons(attack_workers: dict[str, AttackWorker]) -> None:
    """The premise of the attacks below: these workers went through the full boot order."""
    for worker in attack_workers.values():
        sandbox = worker.sandbox
        assert sandbox["seccomp_mode"] == 2 and sandbox["all_threads_filtered"] is True, worker.name
        assert sandbox["policy"] == "worker" and sandbox["boot_policy"] == "boot"
        assert 0 not in sandbox["uid"] and sandbox["cap_eff"] == "0000000000000000"
        for tid in os.listdir(f"/proc/{worker.pid}/task"):
            assert proc_status(f"/proc/{worker.pid}/task/{tid}/status")["Seccomp"] == "2"
        np.testing.assert_allclose(worker.infer(), expected_y(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attack", FATAL_ATTACKS)
def test_a_forbidden_call_from_a_real_worker_fails(attack_workers: dict[str, AttackWorker], attack: str) -> None:
    worker = attack_workers[attack]
    np.testing.assert_allclose(worker.infer(), expected_y(X), rtol=1e-4, atol=1e-4)  # the session works right up to it
    outcome = worker.attack(attack)
    assert outcome in BLOCKED, f"{attack} from inside a worker: {outcome}\n{worker.drain_stderr()[-2000:]}"
    if outcome == "SIGSYS":
        assert worker.spawned.process.returncode == -signal.SIGSYS
    else:  # refused softly: the worker must still serve
        np.testing.assert_allclose(worker.infer(), expected_y(X), rtol=1e-4, atol=1e-4)


def test_soft_denials_leave_a_real_worker_serving(attack_workers: dict[str, AttackWorker]) -> None:
    worker = attack_workers["soft"]
    outcomes = {name: worker.attack(name) for name in SOFT_ATTACKS}
    assert all(outcome in BLOCKED - {"SIGSYS"} for outcome in outcomes.values()), outcomes
    assert not Path(f"/tmp/openinfer-attack-{worker.pid}").exists()
    for _ in range(3):
        np.testing.assert_allclose(worker.infer(), expected_y(X), rtol=1e-4, atol=1e-4)
    worker.send([b"quit"])  # and it still shuts down cleanly
    assert worker.spawned.process.wait(15) == 0, worker.drain_stderr()[-3000:]
