"""What a steps module is, and what the worker hands back when one fails.

A steps module (a built-in under openinfer/daemon/steps/builtin/, or a `.py` file beside the model's
config.toml) may define:

    FILES: tuple[str, ...]         data files beside config.toml it needs (built-ins; a repository module
                                   lists them in config.toml's `[steps] files`)
    INPUTS: list[dict]             what clients send, as tensor specs {name, datatype, shape} (with `pre`)
    OUTPUTS: list[dict]            what clients get back (with `post`, or when `pre` may answer itself)
    setup(files: dict[str, bytes]) once, when the worker loads, with the bytes of FILES
    pre(inputs: dict[str, numpy.ndarray]) -> dict[str, numpy.ndarray] | Answer
    post(outputs: dict[str, numpy.ndarray]) -> dict[str, Any]
    drive(inputs, model) -> dict[str, Any]   instead of pre and post: the step calls model(tensors) -> the
                                   model's outputs as often as it needs (a recurrent model over a stream)

BYTES inputs reach `pre` as numpy object arrays of `bytes`, exactly as the client sent them. A `pre` that
can decide without the model (Magika does not run its model on files under 8 bytes) returns an Answer:
the reply's outputs, final; neither the model nor `post` runs.
"""
from __future__ import annotations

from typing import Any

INVALID_ARGUMENT = "INVALID_ARGUMENT"
INTERNAL = "INTERNAL"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
# Calls of one model by a drive step in one request: past this the request fails RESOURCE_EXHAUSTED, and a
# worker reporting more (in a reply's `stages`, or its ledger) is not believed.
MAX_MODEL_CALLS = 1 << 20


class Answer(dict[str, Any]):
    """Returned by a pre step that answers the request itself: these are the reply's outputs."""


class StepFailed(Exception):
    """A step raised or returned something the reply cannot carry. `code` is the wire error code: a pre
    step that refuses the caller's data (ValueError, TypeError, UnicodeError, LookupError) is the caller's
    mistake (INVALID_ARGUMENT); a step out of memory is RESOURCE_EXHAUSTED; anything else is INTERNAL."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_CALLERS_MISTAKES = (ValueError, TypeError, LookupError)  # UnicodeError is a ValueError


def step_failed(role: str, module: str, exc: BaseException) -> StepFailed:
    """The error for `exc`, raised by the `role` step ("pre", "post" or "drive") of `module`; the message names both."""
    if isinstance(exc, StepFailed):
        return exc
    if isinstance(exc, MemoryError):
        code = RESOURCE_EXHAUSTED
    elif role in ("pre", "drive") and isinstance(exc, _CALLERS_MISTAKES):  # refusing the caller's data
        code = INVALID_ARGUMENT
    else:
        code = INTERNAL
    detail = str(exc).strip()
    return StepFailed(code, f"the {role} step of {module} failed: {type(exc).__name__}" + (f": {detail}" if detail else "")[:1500])
