"""Error codes and the exception hierarchy shared by the daemon and every client.

Errors cross the wire as ``{"code": str, "message": str, "details": map}``; never as pickles.
"""
from __future__ import annotations

import enum
from typing import Any, Mapping


class ErrorCode(str, enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    WORKER_CRASHED = "WORKER_CRASHED"
    UNAVAILABLE = "UNAVAILABLE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


class OpenInferError(Exception):
    """Base of every error a call can raise; ``.code`` is the wire code string."""

    code: str = ErrorCode.INTERNAL.value

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # (a map, or nothing: what a broken or fake daemon sends in its place is dropped, not raised)
        self.details: dict[str, Any] = dict(details) if isinstance(details, Mapping) else {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            wire["details"] = self.details
        return wire


class InvalidArgument(OpenInferError):
    code = ErrorCode.INVALID_ARGUMENT.value


class NotFound(OpenInferError):
    code = ErrorCode.NOT_FOUND.value


class ResourceExhausted(OpenInferError):
    code = ErrorCode.RESOURCE_EXHAUSTED.value


class DeadlineExceeded(OpenInferError):
    code = ErrorCode.DEADLINE_EXCEEDED.value


class WorkerCrashed(OpenInferError):
    code = ErrorCode.WORKER_CRASHED.value


class Unavailable(OpenInferError):
    code = ErrorCode.UNAVAILABLE.value


class PermissionDenied(OpenInferError):
    code = ErrorCode.PERMISSION_DENIED.value


class Internal(OpenInferError):
    code = ErrorCode.INTERNAL.value


_BY_CODE: dict[str, type[OpenInferError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        DeadlineExceeded,
        WorkerCrashed,
        Unavailable,
        PermissionDenied,
        Internal,
    )
}


def error_from_wire(wire: Any) -> OpenInferError:
    """Rebuild the typed exception for an error map received from the daemon."""
    if not isinstance(wire, Mapping):
        return Internal(f"malformed error from daemon: {wire!r}")
    code = str(wire.get("code", ErrorCode.INTERNAL.value))
    cls = _BY_CODE.get(code, Internal)
    err = cls(str(wire.get("message", "")), wire.get("details") or None)
    if cls is Internal and code != ErrorCode.INTERNAL.value:
        err.code = code  # keep codes from a newer daemon visible to the caller
    return err
