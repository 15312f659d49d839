"""A model's steps made callable, in its worker, under the boot seccomp policy (the one onnxruntime parses
the model under) and after the memory limit: a module file's code runs first here, never in the supervisor."""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

from .contract import step_failed
from .sources import StepSources, import_builtin

_SPEC_KEYS = {"name", "datatype", "shape"}


class StepsLoadError(Exception):
    """The steps module cannot be used; the message is what `openinfer status` shows for the model."""


@dataclass
class LoadedSteps:
    module: str  # as config.toml names it, for messages
    pre: Callable[[dict[str, Any]], Any] | None
    post: Callable[[dict[str, Any]], Any] | None
    inputs: list[dict[str, Any]] | None  # what clients send, when there is a pre step
    outputs: list[dict[str, Any]] | None  # what clients get, when there is a post step (or pre answers)
    drive: Callable[[dict[str, Any], Any], Any] | None = None  # calls the model itself (a chain: its models, by name)

    def describe(self, model: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        """The model as clients see it: the steps' ends where there are steps, the model's elsewhere."""
        return {"inputs": self.inputs if (self.pre is not None or self.drive is not None) and self.inputs is not None else model["inputs"],
                "outputs": self.outputs if self.outputs is not None else model["outputs"]}


def load_steps(sources: StepSources) -> LoadedSteps:
    config = sources.config
    name = config.module
    try:
        if config.builtin is not None:
            module = import_builtin(config.builtin)
        else:
            module = types.ModuleType(f"openinfer_model_steps_{abs(hash(name))}")
            assert sources.source is not None
            code = compile(sources.source, name, "exec")
            exec(code, module.__dict__)  # the repository's code, inside this sandboxed worker only
        setup = getattr(module, "setup", None)
        if setup is not None:
            setup(dict(sources.files))
    except Exception as exc:
        raise StepsLoadError(f"the steps module {name} could not be loaded: {step_failed('setup', name, exc)}") from None
    pre, post, drive = getattr(module, "pre", None), getattr(module, "post", None), getattr(module, "drive", None)
    if pre is None and post is None and drive is None:
        raise StepsLoadError(f"the steps module {name} defines neither `pre` nor `post` (nor `drive`)")
    if drive is not None and (pre is not None or post is not None):
        raise StepsLoadError(f"the steps module {name} defines `drive` and `pre`/`post`: a module that drives the model does both itself")
    for role, fn in (("pre", pre), ("post", post), ("drive", drive)):
        if fn is not None and not callable(fn):
            raise StepsLoadError(f"`{role}` in the steps module {name} is not a function")
    takes = pre is not None or drive is not None
    inputs = _specs(name, "INPUTS", getattr(module, "INPUTS", None)) if takes else None
    if takes and inputs is None:
        raise StepsLoadError(f"the steps module {name} has a {'pre' if pre is not None else 'drive'} step but no INPUTS: clients must be told what to send")
    outputs = _specs(name, "OUTPUTS", getattr(module, "OUTPUTS", None))
    if (post is not None or drive is not None) and outputs is None:
        raise StepsLoadError(f"the steps module {name} has a {'post' if post is not None else 'drive'} step but no OUTPUTS: clients must be told what they get")
    return LoadedSteps(name, pre, post, inputs, outputs, drive)


def _specs(module: str, what: str, value: Any) -> list[dict[str, Any]] | None:
    """Plain copies of the module's declared specs (the supervisor checks them again in HELLO)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise StepsLoadError(f"{what} of the steps module {module} must be a non-empty list of {{name, datatype, shape}}")
    specs: list[dict[str, Any]] = []
    for spec in value:
        if not isinstance(spec, dict) or set(spec) != _SPEC_KEYS:
            raise StepsLoadError(f"{what} of the steps module {module}: each entry is exactly {{name, datatype, shape}}, got {spec!r}"[:500])
        specs.append({"name": str(spec["name"]), "datatype": str(spec["datatype"]), "shape": [int(d) for d in spec["shape"]]})
    names: list[str] = [spec["name"] for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise StepsLoadError(f"{what} of the steps module {module} names a tensor twice: {twice}")
    return specs
