"""OpenInfer client library: `Client` (blocking) and `AsyncClient` (asyncio) over the wire protocol v1."""
from .async_client import AsyncClient
from openinfer.wire.errors import (
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
from openinfer.wire.tensors import BF16Array

__all__ = [
    "AsyncClient",
    "BF16Array",
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
