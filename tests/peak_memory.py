"""Run a program and measure its peak memory: for attacks whose harm is the victim's memory."""
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
