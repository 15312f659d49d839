"""Real daemon, real sandboxed workers, real published models: answers equal in-process onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon_harness import RunningDaemon
from reference import assert_same_outputs, run_reference, sample_inputs

pytestmark = pytest.mark.live

PUBLISHED = ["silero_vad", "magika_scores", "ocr_det", "ocr_cls", "tiny"]  # magika_scores: the magika model without its steps


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_model_matches_in_process_onnxruntime(daemon: RunningDaemon, model_repo: Path, name: str) -> None:
    feed = sample_inputs(name.removesuffix("_scores")) if name != "tiny" else {"x": np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)}
    result = daemon.client().infer(name, feed)
    assert result.model == name and result.version == 1
    assert_same_outputs(result.outputs, run_reference(model_repo / name / "1" / "model.onnx", feed))


def test_silero_int64_scalar_and_multiple_outputs(daemon: RunningDaemon, model_repo: Path) -> None:
    feed = sample_inputs("silero_vad")
    assert feed["sr"].shape == () and feed["sr"].dtype == np.int64
    result = daemon.client().infer("silero_vad", feed)
    assert set(result.outputs) == {"output", "stateN"}
    assert result.outputs["stateN"].shape == (2, 1, 128)
    assert 0.0 <= float(result.outputs["output"][0, 0]) <= 1.0


def test_magika_int32_input_names_the_right_file_type(daemon: RunningDaemon, model_repo: Path) -> None:
    feed = sample_inputs("magika")
    assert feed["bytes"].dtype == np.int32
    scores = daemon.client().infer("magika_scores", feed).outputs["target_label"]
    labels = (model_repo / "magika_scores" / "labels.txt").read_text().split()
    assert labels[int(np.argmax(scores[0]))] == "python"


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 64, 96), (1, 3, 96, 64)])
def test_dynamic_4d_image_shapes(daemon: RunningDaemon, model_repo: Path, shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    result = daemon.client().infer("ocr_det", {"x": image})
    assert_same_outputs(result.outputs, run_reference(model_repo / "ocr_det" / "1" / "model.onnx", {"x": image}))
    assert result.outputs["sigmoid_0.tmp_0"].shape == (shape[0], 1, shape[2], shape[3])


def test_generated_models_cover_multi_io_int32_strings_and_scalars(daemon: RunningDaemon, model_repo: Path) -> None:
    client = daemon.client()
    feeds = {
        "multi": {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.array([1, -2, 3], dtype=np.int32)},
        "scalar": {"x": np.array([1.5, -2.0], dtype=np.float32), "k": np.array(3, dtype=np.int64)},
        "strings": {"text": np.array([b"hello", "w\u00f6rld".encode(), b""], dtype=object)},
        "conv": {"image": np.random.default_rng(0).random((1, 3, 17, 9), dtype=np.float32)},
    }
    for name, feed in feeds.items():
        result = client.infer(name, feed)
        assert_same_outputs(result.outputs, run_reference(model_repo / name / "1" / "model.onnx", feed))


def test_output_filter_returns_only_requested_outputs(daemon: RunningDaemon) -> None:
    result = daemon.client().infer("silero_vad", sample_inputs("silero_vad"), outputs=["stateN"])
    assert list(result.outputs) == ["stateN"]


def test_newest_version_serves_by_default_and_versions_can_be_named(daemon: RunningDaemon, model_repo: Path) -> None:
    client = daemon.client()
    x = np.ones((1, 64), dtype=np.float32)
    default = client.infer("versioned", {"x": x})
    v1 = client.infer("versioned", {"x": x}, version=1)
    v2 = client.infer("versioned", {"x": x}, version=2)
    assert default.version == 2 and v1.version == 1 and v2.version == 2
    np.testing.assert_array_equal(default.outputs["y"], v2.outputs["y"])
    assert not np.allclose(v1.outputs["y"], v2.outputs["y"])
    assert_same_outputs(v1.outputs, run_reference(model_repo / "versioned" / "1" / "model.onnx", {"x": x}))
    assert client.metadata("versioned")["versions"] == [1, 2]


def test_metadata_comes_from_the_model_with_oip_types_and_dynamic_dims(daemon: RunningDaemon) -> None:
    meta = daemon.client().metadata("silero_vad")
    assert meta["platform"] == "onnxruntime_onnx"
    inputs = {spec["name"]: spec for spec in meta["inputs"]}
    assert inputs["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, -1]}
    assert inputs["state"]["shape"] == [2, -1, 128]
    assert inputs["sr"] == {"name": "sr", "datatype": "INT64", "shape": []}
    assert {o["name"] for o in meta["outputs"]} == {"output", "stateN"}
    assert daemon.client().metadata("magika_scores")["inputs"][0]["datatype"] == "INT32"
    # A model with steps is described as clients see it: what its pre step takes, what its post step gives.
    assert daemon.client().metadata("magika")["inputs"] == [{"name": "bytes", "datatype": "BYTES", "shape": []}]


def test_a_model_that_fails_to_load_is_reported_and_the_others_serve(daemon: RunningDaemon) -> None:
    client = daemon.client()
    rows = {(r["name"], r["version"]): r for r in client.models()}
    broken = rows[("broken", 1)]
    assert broken["state"] == "failed"
    # Text that is not protobuf is refused by the worker's external-data walker before onnxruntime sees it.
    assert "broken/1/model.onnx is not a valid ONNX model" in broken["reason"], broken["reason"]
    assert rows[("tiny", 1)]["state"] == "ready"
    health = client.health()
    assert health["ready"] is True
    assert any(f["model"] == "broken:1" for f in health["failed"])
    assert client.infer("tiny", {"x": np.zeros((1, 64), np.float32)}).outputs["y"].shape == (1, 64)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "front-door"])
def test_timing_breakdown_is_present_and_consistent(daemon: RunningDaemon, direct: bool) -> None:
    """PROTOCOL.md 5.3: through the front door every stage; on the direct path the same but the two
    supervisor hops (dispatch_us, return_us), which it does not have."""
    result = daemon.client(direct=direct).infer("ocr_cls", sample_inputs("ocr_cls"))
    t = result.timing
    hops = ("dispatch_us", "return_us")
    for key in ("queue_us", "compute_us", "total_us", "decode_us", "prep_us", "encode_us", "cpu_us", "client_us", "transport_us", *(() if direct else hops)):
        assert key in t and t[key] >= 0, key
    assert direct != any(key in t for key in hops), t
    stages = sum(t.get(k, 0.0) for k in ("decode_us", "queue_us", "dispatch_us", "prep_us", "compute_us", "encode_us", "return_us"))
    assert stages <= t["total_us"] + 1e-6
    assert t["total_us"] <= t["client_us"]
    assert t["compute_us"] > 0


def test_stats_count_requests_per_model(daemon: RunningDaemon) -> None:
    client = daemon.client(client_name="stats-probe")
    before = client.stats()["models"].get("tiny", {}).get("requests", 0)
    for _ in range(5):
        client.infer("tiny", {"x": np.zeros((1, 64), np.float32)})
    stats = client.stats()
    assert stats["models"]["tiny"]["requests"] == before + 5
    mine = [v for k, v in stats["clients"].items() if k.startswith("stats-probe@")]
    assert len(mine) == 1 and mine[0]["requests"] == 5 and mine[0]["success"] == 5
