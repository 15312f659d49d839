"""OpenInfer client library: `Client` (blocking) and `AsyncClient` (asyncio) over the wire protocol v1."""
from .async_client import AsyncClient
from .errors import (
    DeadlineExceeded,
    ErrorCode,
    Internal,
    InvalidArgument,
    NotFound,
    OpenInferError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    WorkerCrashed,
)
from .result import InferResult
from .sync_client import Client

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "ErrorCode",
    "InferResult",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OpenInferError",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "WorkerCrashed",
]
