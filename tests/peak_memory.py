"""Run a program, or a client attacked by what answers it, and measure its peak memory: for attacks whose
harm is the victim's memory."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

# A parent of its own, so that RUSAGE_CHILDREN's ru_maxrss is the measured program's peak alone (not any
# other child this test process ran).
_PARENT = '''
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[2:], capture_output=True, text=True, timeout=float(sys.argv[1]))
print(json.dumps({"stdout": done.stdout, "stderr": done.stderr, "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
'''


def run_with_peak(argv: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """{"stdout", "stderr", "peak": bytes} of `argv` run to its end."""
    done = subprocess.run([sys.executable, "-c", _PARENT, str(timeout), *argv], capture_output=True, text=True, timeout=timeout + 30)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]



# A Python client alone in its process, asking `model` with {"what": WHAT} (the attack's trigger, for a
# hostile steps module or a fake daemon): what it raised, how much its peak memory grew meanwhile, and on
# the direct path whether its next request (on a new link) is served. On the direct path a first request
# opens the link, so that the attack's request finds it open.
_ATTACKED_CLIENT = '''
import json, resource, sys
from openinfer.client import Client, OpenInferError

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

address, model, what, timeout, direct = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "direct"
with Client(address, timeout=timeout, direct=direct) as client:
    if direct:
        assert client.infer(model, {"what": "fine"}).outputs["got"].item() == b"ran"
    before = peak()
    try:
        result = client.infer(model, {"what": what})
        outcome = {"code": "OK", "message": "a result", "front_door": "dispatch_us" in result.timing}
    except OpenInferError as exc:
        outcome = {"code": exc.code, "message": exc.message}
    except BaseException as exc:
        outcome = {"code": "raw " + type(exc).__name__, "message": str(exc)}
    outcome["grown"] = peak() - before
    if direct:
        try:
            outcome["next"] = client.infer(model, {"what": "fine"}, timeout=5).outputs["got"].item().decode()
        except OpenInferError as exc:
            outcome["next"] = exc.code
print(json.dumps(outcome))
'''


def attacked_client(address: str, what: str, timeout: float = 10.0, *, model: str = "hostile", path: str = "direct") -> dict[str, Any]:
    """_ATTACKED_CLIENT's outcome: {"code", "message", "grown": bytes, and "next" on the direct path}."""
    done = subprocess.run([sys.executable, "-c", _ATTACKED_CLIENT, address, model, what, str(timeout), path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
