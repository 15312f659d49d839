"""The hardened unit, checked by systemd's own tools (no systemd as PID 1 needed).

`systemd-analyze verify` exits 0 even on unknown keys, so any output fails the test. `systemd-analyze
security --offline=true` scores the sandbox (0 = locked down, 10 = exposed); the unit must stay <= 1.5.
These tools come from the Debian package `systemd`; without it the tests fail (they never skip).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = ROOT / "systemd"
UNIT = SYSTEMD_DIR / "openinfer.service"
TCP_DROP_IN = SYSTEMD_DIR / "openinfer-tcp.conf"
SHIPPED_EXEC = "/opt/openinfer/bin/openinfer"
MAX_EXPOSURE = 1.5  # the gate for the ipc:// unit
MAX_EXPOSURE_TCP = 2.0  # with the tcp drop-in the service has the host's network by design

# What the supervisor and a booting worker call before any worker policy is in force (the policies
# themselves are checked from policies/*.toml): spawning, namespaces, Landlock, seccomp, the socket lock.
DAEMON_SYSCALLS = {
    "seccomp", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "unshare", "prctl",
    "prlimit64", "setrlimit", "execve", "clone", "vfork", "wait4", "waitid", "pidfd_open", "kill", "flock",
    "socket", "socketpair", "bind", "listen", "accept4", "connect", "eventfd2", "epoll_create1", "pipe2",
    "memfd_create", "fchmodat", "unlink", "mkdir", "getdents64", "sched_setscheduler", "sched_setaffinity",
}


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package `systemd` (apt-get install -y systemd)")
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=120)


def installed_openinfer() -> str:
    """The `openinfer` console script of the Python running the tests (verify needs an existing ExecStart)."""
    candidate = Path(sys.executable).parent / "openinfer"
    found = str(candidate) if candidate.exists() else shutil.which("openinfer")
    assert found, "the openinfer console script is not installed next to this Python"
    return found


def stage_unit(directory: Path, *, tcp: bool = False, unit_text: str | None = None) -> Path:
    """Copy the unit (and drop-in) into `directory`, with only ExecStart's binary pointing at a real file."""
    text = UNIT.read_text() if unit_text is None else unit_text
    assert text.count(SHIPPED_EXEC) == 1, f"expected ExecStart={SHIPPED_EXEC} ... exactly once"
    staged = directory / "openinfer.service"
    staged.write_text(text.replace(SHIPPED_EXEC, installed_openinfer()))
    if tcp:
        drop_in_dir = directory / "openinfer.service.d"
        drop_in_dir.mkdir()
        shutil.copy(TCP_DROP_IN, drop_in_dir / "tcp.conf")
    return staged


def verify_output(unit: Path) -> str:
    result = run_tool("systemd-analyze", "verify", "--man=no", str(unit))
    return (result.stdout + result.stderr).strip() + (f"\n(exit status {result.returncode})" if result.returncode else "")


def exposure(unit: Path, threshold: float) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Overall exposure (0.0-10.0) and the run; --threshold takes the score times ten as an integer."""
    result = run_tool("systemd-analyze", "security", "--offline=true", f"--threshold={round(threshold * 10)}", str(unit))
    match = re.search(r"Overall exposure level for openinfer\.service: (\d+\.\d+)", result.stdout)
    assert match, f"no overall exposure in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), result


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The syscalls in a systemd group (@system-service, ...), nested groups expanded."""
    result = run_tool("systemd-analyze", "syscall-filter", name)
    assert result.returncode == 0, result.stderr
    names: set[str] = set()
    for line in result.stdout.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            names |= syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(names)


def allowed_syscalls(text: str) -> set[str]:
    """Apply the unit's SystemCallFilter= lines in order (allow list first, then ~ removals)."""
    allowed: set[str] = set()
    for value in unit_settings(text)["SystemCallFilter"]:
        negate = value.startswith("~")
        names: set[str] = set()
        for token in value.lstrip("~").split():
            names |= syscall_group(token) if token.startswith("@") else {token}
        allowed = allowed - names if negate else allowed | names
    return allowed


def test_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    assert verify_output(stage_unit(tmp_path)) == ""


def test_unit_with_tcp_drop_in_verifies_without_any_warning(tmp_path: Path) -> None:
    assert verify_output(stage_unit(tmp_path, tcp=True)) == ""


def test_verify_catches_a_typo(tmp_path: Path) -> None:
    """The gate above is only worth something if a misspelt hardening option shows up."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    assert "ProtectSytem" in verify_output(stage_unit(tmp_path, unit_text=broken))


def test_security_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    score, result = exposure(stage_unit(tmp_path), MAX_EXPOSURE)
    assert score <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, f"systemd-analyze --threshold failed:\n{result.stdout}"
    assert result.stderr.strip() == "", result.stderr


def test_security_threshold_rejects_a_weaker_unit(tmp_path: Path) -> None:
    weaker = re.sub(r"^(PrivateNetwork|ProtectSystem|SystemCallFilter|RestrictAddressFamilies)=.*\n", "", UNIT.read_text(), flags=re.M)
    score, result = exposure(stage_unit(tmp_path, unit_text=weaker), MAX_EXPOSURE)
    assert score > MAX_EXPOSURE and result.returncode != 0


def test_security_exposure_with_tcp_drop_in(tmp_path: Path) -> None:
    score, result = exposure(stage_unit(tmp_path, tcp=True), MAX_EXPOSURE_TCP)
    assert score <= MAX_EXPOSURE_TCP and result.returncode == 0, result.stdout
    assert "✗ PrivateNetwork=" in result.stdout  # the drop-in really was applied
    assert result.stderr.strip() == "", result.stderr


def test_unit_has_the_settings_the_daemon_relies_on() -> None:
    settings = unit_settings(UNIT.read_text())
    expect = {
        "Type": "notify", "NotifyAccess": "main", "KillMode": "mixed", "OOMPolicy": "continue",
        "User": "openinfer", "Group": "openinfer-clients", "RuntimeDirectory": "openinfer",
        "RuntimeDirectoryMode": "0750", "PrivateNetwork": "yes", "RestrictAddressFamilies": "AF_UNIX",
        "RestrictNamespaces": "user net ipc", "MemoryDenyWriteExecute": "yes", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "", "SystemCallErrorNumber": "EPERM", "UMask": "0077",
    }
    for key, value in expect.items():
        assert settings.get(key) == [value], f"{key}={settings.get(key)}, expected {value!r}"
    assert settings["ExecStart"] == [f"{SHIPPED_EXEC} serve --config /etc/openinfer/openinfer.toml"]
    assert "ProcSubset" not in settings  # onnxruntime reads /proc/cpuinfo
    assert re.fullmatch(r"\d+s", settings["WatchdogSec"][0])


def test_syscall_filter_allows_what_the_daemon_needs() -> None:
    missing = DAEMON_SYSCALLS - allowed_syscalls(UNIT.read_text())
    assert not missing, f"the unit's SystemCallFilter= denies {sorted(missing)}"


@pytest.mark.parametrize("policy", ["worker", "boot"])
def test_syscall_filter_allows_every_syscall_the_worker_policies_allow(policy: str) -> None:
    """A syscall a policy allows but the unit denies fails with EPERM in production only."""
    document = tomllib.loads((ROOT / "policies" / f"{policy}.toml").read_text())
    wanted = {name for rule in document["rule"] if rule["action"] == "allow" for name in rule["syscalls"]}
    missing = wanted - allowed_syscalls(UNIT.read_text())
    assert not missing, f"policies/{policy}.toml allows {sorted(missing)}, the unit's SystemCallFilter= denies them"


def test_chown_is_denied_so_the_shipped_config_sets_no_socket_group() -> None:
    assert "fchownat" not in allowed_syscalls(UNIT.read_text())
    config = tomllib.loads((SYSTEMD_DIR / "openinfer.toml").read_text())
    assert config["server"].get("socket_group", "") == ""


def test_sysusers_creates_the_service_user_and_client_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run_tool("systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD_DIR / "sysusers.d" / "openinfer.conf"))
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert "openinfer-clients" in groups
    assert passwd["openinfer"][5] == "/var/lib/openinfer"
    assert passwd["openinfer"][6].endswith("nologin")


def id_table(path: Path) -> dict[str, int]:
    """name -> id from an /etc/passwd or /etc/group file."""
    return {fields[0]: int(fields[2]) for fields in (line.split(":") for line in path.read_text().splitlines())}


@pytest.mark.skipif(os.geteuid() != 0, reason="creating files owned by the service user needs root (CI runs as root)")
def test_tmpfiles_creates_the_model_directory_for_the_service(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    run_tool("systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD_DIR / "sysusers.d" / "openinfer.conf"))
    result = run_tool("systemd-tmpfiles", f"--root={tmp_path}", "--create", str(SYSTEMD_DIR / "tmpfiles.d" / "openinfer.conf"))
    assert result.returncode == 0, result.stderr
    state = tmp_path / "var" / "lib" / "openinfer"
    models = state / "models"
    assert models.is_dir()
    assert (models.stat().st_uid, models.stat().st_mode & 0o777) == (0, 0o755)  # root's; the daemon only reads
    uids, gids = id_table(tmp_path / "etc" / "passwd"), id_table(tmp_path / "etc" / "group")
    unit = unit_settings(UNIT.read_text())
    # Same owner, group and mode as StateDirectory= gives it, so systemd never re-owns the models below it.
    assert unit["User"] == ["openinfer"] and unit["Group"] == ["openinfer-clients"]
    expected = (uids["openinfer"], gids["openinfer-clients"], int(unit["StateDirectoryMode"][0], 8))
    assert (state.stat().st_uid, state.stat().st_gid, state.stat().st_mode & 0o777) == expected
