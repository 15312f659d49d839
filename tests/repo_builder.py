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

import onnx_builders
from daemon_harness import EXAMPLE_MODELS, world_readable_dir

# A pre step that spins for the request's `seconds` (an FP32 scalar), then feeds the model zeros: busy, as a
# long run is, in Python that onnxruntime's stop flag cannot reach - a run its worker cannot stop, for as
# long as the caller asks (`ModelRepo.spinning_model`).
SPIN_STEPS = '''
import time

INPUTS = [{"name": "seconds", "datatype": "FP32", "shape": []}]

def pre(inputs):
    end = time.monotonic() + float(inputs["seconds"])
    while time.monotonic() < end:  # the worker's loop answers nothing meanwhile
        pass
    return {"x": __import__("numpy").zeros((1, 64), "float32")}
'''


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

    def spinning_model(self, name: str, config: str) -> None:
        """`name`: the tiny matmul model behind SPIN_STEPS; `config` is its config.toml but the [steps]
        table, which this adds."""
        self.model(name, onnx_builders.matmul_model, config=config + '\n[steps]\nmodule = "steps.py"\n')
        (self.root / name / "steps.py").write_text(SPIN_STEPS)

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
