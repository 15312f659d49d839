"""`openinfer serve`, except that models named "hostile-<attack>" get a compromised worker
(hostile_worker.py) instead of the real one. Everything else — the supervisor, the channel, the other
workers, their sandbox — is the real daemon; only what cannot be produced here (a worker taken over by
an exploit) is simulated, by a program that speaks the worker channel and lies.

Run as `python hostile_daemon.py serve --models DIR ...` (the arguments of `openinfer serve`).
"""
from __future__ import annotations

import sys
from pathlib import Path

HOSTILE_WORKER = Path(__file__).resolve().parent / "hostile_worker.py"

# Replaces the spawner's shim (the code every worker process starts with). It accepts the old form
# (argv[1] = the status pipe fd) and the new one (a comma list of fds put at 3, 4, ...).
SHIM = (
    "import os,sys,json,fcntl\n"
    "fds=[int(f) for f in sys.argv[1].split(',')]\n"
    "high=[fcntl.fcntl(f,fcntl.F_DUPFD_CLOEXEC,16) for f in fds]\n"
    "for i,f in enumerate(high): os.dup2(f,3+i,inheritable=False)\n"
    "for f in set(fds+high)-set(range(3,3+len(fds))): os.close(f)\n"
    "if json.loads(sys.argv[2])['model'].startswith('hostile-'):\n"
    f"    sys.argv=[{str(HOSTILE_WORKER)!r}, '', sys.argv[2]]\n"
    f"    exec(compile(open({str(HOSTILE_WORKER)!r}).read(), 'hostile_worker', 'exec'), {{'__name__': '__main__'}})\n"
    "    sys.exit(0)\n"
    "from openinfer.daemon.worker.boot import main\n"
    "sys.exit(main([sys.argv[0], sys.argv[2]]))\n"
)

if __name__ == "__main__":
    from openinfer.daemon.workerpool import spawner

    spawner._SHIM = SHIM  # type: ignore[attr-defined]
    from openinfer.daemon.cli import main

    sys.argv[0] = "openinfer"
    main()
