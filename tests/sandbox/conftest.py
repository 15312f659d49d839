"""Fixtures for the sandbox tests: a small model and the helpers' directory on sys.path.

These tests attack real seccomp filters, Landlock rulesets and namespaces: nothing is mocked. Anything that
needs onnxruntime runs in a freshly spawned subprocess, so the pytest process stays safe to fork from.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from sandbox_model import build_model

    return build_model(tmp_path_factory.mktemp("sandbox-model") / "model.onnx")


@pytest.fixture()
def write_policy(tmp_path: Path) -> Callable[..., Path]:
    """Write a policy file and return its path: write_policy("text", name="x.toml")."""

    def write(text: str, name: str = "policy.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # keep the (forking) pytest process nearly single-threaded
