"""The `[steps]` table of a model's config.toml, checked where it is read (the supervisor never runs a step):

    [steps]
    module = "openinfer:magika"          # a built-in (openinfer/daemon/steps/builtin/magika.py) ...
    # module = "steps.py"                # ... or a file beside config.toml, read with the worker's rights
    # files = ["labels.txt"]             # data files beside config.toml handed to the module's setup()
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "openinfer:"
BUILTIN_DIR = Path(__file__).parent / "builtin"
# A plain file name beside config.toml: no directory part, no leading dot, nothing to resolve.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_FILES = 16
MAX_FILE_BYTES = 64 * 1024 * 1024  # a step's module or data file: larger is refused when the worker reads it


class StepsConfigError(ValueError):
    pass


@dataclass(frozen=True)
class StepsConfig:
    module: str  # "openinfer:<name>" or "<file>.py"
    files: tuple[str, ...] = ()

    @property
    def builtin(self) -> str | None:
        """The built-in's name, or None for a module file beside config.toml."""
        return self.module[len(BUILTIN_PREFIX):] if self.module.startswith(BUILTIN_PREFIX) else None

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "files": list(self.files)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "StepsConfig":
        return cls(raw["module"], tuple(raw.get("files", ())))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.py") if not p.stem.startswith("_"))


def parse_steps(where: str, raw: Any) -> StepsConfig:
    if not isinstance(raw, dict):
        raise StepsConfigError(f"{where}: `steps` must be a table")
    unknown = set(raw) - {"module", "files"}
    if unknown:
        raise StepsConfigError(f"{where}: unknown key `steps.{sorted(unknown)[0]}` (known: files, module)")
    module = raw.get("module")
    if not isinstance(module, str):
        raise StepsConfigError(f"{where}: `steps.module` is required: \"openinfer:<name>\" for a built-in ({', '.join(builtin_names())}) or the name of a .py file beside config.toml")
    if module.startswith(BUILTIN_PREFIX):
        if module[len(BUILTIN_PREFIX):] not in builtin_names():
            raise StepsConfigError(f"{where}: `steps.module` {module!r} is not a built-in; built-ins: {', '.join(BUILTIN_PREFIX + n for n in builtin_names())}")
    elif not (module.endswith(".py") and _FILE_NAME.fullmatch(module)):
        raise StepsConfigError(f"{where}: `steps.module` {module!r} must be \"openinfer:<name>\" or a plain .py file name beside config.toml (no directory, no leading dot)")
    files = raw.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise StepsConfigError(f"{where}: `steps.files` must be a list of file names")
    bad = [f for f in files if not _FILE_NAME.fullmatch(f)]
    if bad:
        raise StepsConfigError(f"{where}: `steps.files` entry {bad[0]!r} is not a plain file name beside config.toml (no directory, no leading dot)")
    if len(set(files)) != len(files):
        raise StepsConfigError(f"{where}: `steps.files` lists a file twice")
    if len(files) > MAX_FILES:
        raise StepsConfigError(f"{where}: `steps.files` lists {len(files)} files; at most {MAX_FILES}")
    return StepsConfig(module, tuple(files))
