"""Model repositories for the live tests, in one place.

Workers drop to `nobody`, so a repository must be world-readable (pytest's tmp_path is 0700 root-only):
`ModelRepo` makes one in a fresh temporary directory, fills it, and `ready()` opens every path in it up
(directories 0755, files 0644) before a daemon reads it. `remove()` deletes it again.

    repo = ModelRepo("oi-access-")
    repo.model("public", onnx_builders.matmul_model)
    repo.model("secret", lambda path: onnx_builders.matmul_model(path, seed=3), config="workers = 1\\n")
    root = repo.ready()
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from daemon_harness import EXAMPLE_MODELS, world_readable_dir


def make_world_readable(root: Path) -> Path:
    """Directories 0755, files 0644, everywhere under `root` (which stays as it is); returns `root`."""
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


class ModelRepo:
    """A repository being built: `<root>/<model>/<version>/model.onnx` plus optional `config.toml`."""

    def __init__(self, prefix: str) -> None:
        self.root = world_readable_dir(prefix)

    def model(self, name: str, build: Callable[[Path], Any], *, version: int = 1, config: str | None = None) -> Path:
        """`build(path)` writes the model file (e.g. an onnx_builders function); returns its path."""
        path = self.root / name / str(version) / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        build(path)
        if config is not None:
            self.config(name, config)
        return path

    def config(self, name: str, text: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / name / "config.toml").write_text(text)

    def examples(self, names: Iterable[str] | None = None) -> None:
        """Copy the shipped example models (all of them, or these) in, configs and licenses included."""
        for source in sorted(EXAMPLE_MODELS.iterdir()):
            if names is None or source.name in names:
                shutil.copytree(source, self.root / source.name)

    def ready(self) -> Path:
        """Open everything up for the workers' uid; returns the root to serve."""
        return make_world_readable(self.root)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
