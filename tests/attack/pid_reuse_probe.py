"""Run in a pid namespace of its own (`unshare -pf --mount-proc`, as tests/attack/test_pid_reuse.py does):
starts a daemon serving `slow` (its step spins for the request's seconds) and `idle`, keeps `slow` busy
through the front door, stops the daemon hard (SIGTERM twice), and once `idle`'s worker has left and been
reaped starts an unrelated process at the pid it had (the namespace's ns_last_pid makes that pid the
next one). Prints what became of that process as one JSON line: {"decoys": n, "killed": k}.

    python pid_reuse_probe.py MODELS_DIR
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon_harness import log_records, start_daemon, wait_for  # noqa: E402
from openinfer.client import Client, OpenInferError  # noqa: E402


def main(models: Path) -> dict[str, int]:
    daemon = start_daemon(models, env={"OPENINFER_POOL_DIRECT": "0"})
    try:
        idle_pid = next(w["pid"] for w in daemon.client().status()["workers"] if w["model"] == "idle")

        def busy() -> None:
            try:
                with Client(daemon.address, timeout=30, direct=False) as client:
                    client.infer("slow", {"seconds": np.array(3.0, np.float32)})
            except OpenInferError:
                pass  # UNAVAILABLE: the hard stop

        caller = threading.Thread(target=busy)
        caller.start()
        admin = daemon.client()
        wait_for(lambda: any(w["state"] == "busy" for w in admin.status()["workers"]), 30, "slow running")
        daemon.process.send_signal(signal.SIGTERM)
        wait_for(lambda: admin.health()["draining"], 30, "draining")
        daemon.process.send_signal(signal.SIGTERM)  # a hard stop: `slow` runs on past its 1 s grace
        wait_for(lambda: any(r.get("msg") == "worker exited" and r.get("pid") == idle_pid for r in log_records(daemon)), 30, "idle's worker reaped")
        decoys = []
        for _ in range(20):
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(idle_pid - 1))
            decoy = subprocess.Popen(["sleep", "60"])
            if decoy.pid == idle_pid:
                decoys.append(decoy)
                break
            decoy.kill()
            decoy.wait()
        daemon.process.wait(30)  # the grace's timers have all run
        caller.join(30)
        killed = sum(1 for decoy in decoys if decoy.poll() == -signal.SIGKILL)
        for decoy in decoys:
            decoy.kill()
            decoy.wait()
        return {"decoys": len(decoys), "killed": killed}
    finally:
        daemon.stop()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
