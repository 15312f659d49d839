"""What a tcp:// CURVE daemon in a test needs: the server's key files, made by the real `openinfer
keygen`, an access policy admitting one client key, and the daemon's environment naming both."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Sequence


def server_keys(directory: Path) -> tuple[Path, bytes]:
    """`openinfer keygen DIRECTORY/server.key`: the secret key file and the server's Z85 public key."""
    key_file = directory / "server.key"
    done = subprocess.run([sys.executable, "-m", "openinfer.daemon.cli", "keygen", str(key_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return key_file, Path(f"{key_file}.pub").read_text().strip().encode()


def key_policy(directory: Path, client_public: bytes, operations: Sequence[str], extra: str = "") -> Path:
    """DIRECTORY/access.toml granting `operations` to the client key (Z85), plus `extra` grants."""
    policy = directory / "access.toml"
    ops = ", ".join(f'"{op}"' for op in operations)
    policy.write_text(f'[[grant]]\nname = "known-key"\ncurve_keys = ["{client_public.decode()}"]\noperations = [{ops}]\n' + extra)
    return policy


def curve_env(directory: Path, client_public: bytes, operations: Sequence[str], extra_grants: str = "", **settings: str) -> tuple[dict[str, str], bytes]:
    """The environment of a daemon serving CURVE with keys and a policy made in `directory` (the policy
    admitting `client_public` to `operations`, plus `extra_grants`), and other settings as
    OPENINFER_* variables; and the server's Z85 public key."""
    key_file, server_public = server_keys(directory)
    policy = key_policy(directory, client_public, operations, extra_grants)
    return {"OPENINFER_SERVER_CURVE_SECRET_KEY_FILE": str(key_file), "OPENINFER_SERVER_ACCESS_POLICY": str(policy), **settings}, server_public
