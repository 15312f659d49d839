"""In-process onnxruntime: the reference every daemon answer is compared against."""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.sample_inputs import sample_inputs  # noqa: E402,F401


@lru_cache(maxsize=None)
def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def run_reference(model_path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(str(model_path))
    prepared = {k: (np.array([e.decode() if isinstance(e, bytes) else e for e in v.reshape(-1)], dtype=object).reshape(v.shape) if v.dtype == object else v) for k, v in feed.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, prepared)))


def assert_same_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, expected in want.items():
        actual = got[name]
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        if expected.dtype == object:
            assert [a.decode() if isinstance(a, bytes) else a for a in actual.reshape(-1)] == list(expected.reshape(-1)), name
        else:
            assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)
