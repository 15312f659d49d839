"""Run the real `openinfer` CLI, with prepare helpers that behave as a compromised helper would.

    python hostile_helper.py PLAN.json serve --models ...

The seam: the daemon is the real one, unmodified; only the few lines of `spawner._SHIM` that every spawned
process runs first get a prelude. In a prepare helper of a model named in the plan, the prelude wraps the
real `prepare()` so that, after the real helper wrote a real prepared directory from its own model, it
misbehaves the way code running inside the helper can (the helper parses an untrusted model, so a parser
exploit runs there):

- `"key": "../escape"` or `"key": "VICTIM"`: report that cache key instead of keeping quiet (VICTIM: the
  key of the prepared directory of the model named `victim`, looked up before the sandbox is entered, as an
  attacker who knows that model's bytes could compute it);
- `"after": "nested-report"`: write a status line nested 5,000 deep and exit (round 66);
- `"after": "hang"`: never exit (round 66);
- `"symlink": PATH`: leave a symlink to PATH in its output directory (made before the sandbox is entered:
  the helper's seccomp policy kills symlink(), a helper that escaped it would not need to).

Workers and the helpers of other models run unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

BOOT_IMPORT = "from openinfer.daemon.worker.boot import main\n"

PRELUDE = r'''
import json as _json, os as _os
_config = _json.loads(sys.argv[2])
_hostile = PLAN.get(_config["model"]) if _config.get("prepare_into") else None
if _hostile:
    import openinfer.daemon.worker.prepare as _prepare_module
    _out = _config["prepare_into"]
    _key = _hostile.get("key")
    if _key == "VICTIM":
        _base = _os.path.dirname(_out)
        for _entry in _os.listdir(_base):
            _manifest = _os.path.join(_base, _entry, "manifest.json")
            if not _entry.startswith(".") and _os.path.exists(_manifest) and "/victim/" in _json.load(open(_manifest))["source"]:
                _key = _entry
        assert _key != "VICTIM", "the victim's prepared directory is not in the cache yet"
    if _hostile.get("symlink"):
        _os.symlink(_hostile["symlink"], _os.path.join(_out, "notes.txt"))
    _real_prepare = _prepare_module.prepare

    def _hostile_prepare(*args, **kwargs):
        manifest = _real_prepare(*args, **kwargs)
        if _hostile.get("after") == "nested-report":
            _os.write(3, b"[" * 5000 + b"\n")
            _os._exit(0)
        if _hostile.get("after") == "hang":  # blocks for good: a read of a pipe nobody writes to
            _never, _unused = _os.pipe()
            _os.read(_never, 1)
        if _key is not None:
            _os.write(3, (_json.dumps({"result": {"key": _key, "reused": False}}) + "\n").encode())
            _os._exit(0)
        return manifest

    _prepare_module.prepare = _hostile_prepare
'''


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    from openinfer.daemon.workerpool import spawner

    assert BOOT_IMPORT in spawner._SHIM, "the spawner's shim changed: update BOOT_IMPORT"
    spawner._SHIM = spawner._SHIM.replace(BOOT_IMPORT, PRELUDE.replace("PLAN", repr(plan)) + BOOT_IMPORT)
    from openinfer.daemon.cli import main as cli

    sys.argv = [sys.argv[0], *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()
