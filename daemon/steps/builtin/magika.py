"""Magika (google/magika, model standard_v3_3): a file's bytes in, its content type out - the `magika`
package's own answer (`Magika().identify_bytes(data).output`, default HIGH_CONFIDENCE mode), computed the
way magika 1.0.3 computes it (magika/magika.py): the first and last 1024 bytes of the file's first and
last 4 KiB, whitespace stripped, padded with 256; files under 8 bytes (or whose stripped start is) are
told apart as text or binary without the model; the model's best label is then mapped
(`overwrite_map`) and kept only above its threshold, else it falls back to "txt" or "unknown".

Its data files sit beside the model's config.toml, copied unchanged from the magika wheel:
`config.min.json` (models/standard_v3_3/) and `content_types_kb.min.json` (config/)."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from openinfer.daemon.steps.contract import Answer

FILES = ("config.min.json", "content_types_kb.min.json")
INPUTS = [{"name": "bytes", "datatype": "BYTES", "shape": []}]  # one file's content, whole
OUTPUTS = [
    {"name": "label", "datatype": "BYTES", "shape": []},  # e.g. b"python", b"pdf", b"txt", b"unknown"
    {"name": "group", "datatype": "BYTES", "shape": []},  # e.g. b"code", b"document", b"text"
    {"name": "mime_type", "datatype": "BYTES", "shape": []},
    {"name": "score", "datatype": "FP32", "shape": []},  # the model's score of its label; 1.0 when no model ran
]

_config: dict[str, Any] = {}
_kb: dict[str, dict[str, Any]] = {}


def setup(files: dict[str, bytes]) -> None:
    global _config, _kb
    config = json.loads(files["config.min.json"])
    for key in ("beg_size", "end_size", "block_size", "padding_token", "min_file_size_for_dl", "medium_confidence_threshold", "target_labels_space", "thresholds", "overwrite_map"):
        if key not in config:
            raise ValueError(f"config.min.json has no {key!r}")
    if config.get("mid_size", 0) or config.get("use_inputs_at_offsets", False):
        raise ValueError("config.min.json asks for mid or offset features, which this step (like magika 1.0.3) does not extract")
    _config = config
    _kb = json.loads(files["content_types_kb.min.json"])


def _verdict(label: str, score: float) -> Answer:
    info = _kb.get(label, {})
    is_text = bool(info.get("is_text"))
    mime = info.get("mime_type") or ("text/plain" if is_text else "application/octet-stream")
    return Answer(label=label, group=info.get("group") or "unknown", mime_type=mime, score=np.float32(score))


def _few_bytes(content: bytes) -> Answer:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return _verdict("unknown", 1.0)
    return _verdict("txt", 1.0)


def pre(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | Answer:
    content = inputs["bytes"].reshape(-1)[0]
    if not isinstance(content, bytes):
        raise TypeError("`bytes` must hold the file's bytes")
    config = _config
    size = len(content)
    if size == 0:
        return _verdict("empty", 1.0)
    if size < config["min_file_size_for_dl"]:
        return _few_bytes(content)
    block, padding = config["block_size"], config["padding_token"]
    beg_size, end_size = config["beg_size"], config["end_size"]
    window = min(block, size)
    head = content[:window].lstrip()[:beg_size]
    tail = content[size - window:].rstrip()
    tail = tail[len(tail) - end_size:] if len(tail) > end_size else tail
    features = np.full((1, beg_size + end_size), padding, dtype=np.int32)
    features[0, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    features[0, beg_size + end_size - len(tail):] = np.frombuffer(tail, dtype=np.uint8)
    if features[0, config["min_file_size_for_dl"] - 1] == padding:  # too little left once stripped
        return _few_bytes(content[:window])
    return {"bytes": features}


def post(outputs: dict[str, np.ndarray]) -> Answer:
    config = _config
    scores = outputs["target_label"][0]
    best = int(np.argmax(scores))  # the first of equal maxima, as magika's max(range(...), key=...)
    score = float(scores[best])
    dl_label = config["target_labels_space"][best]
    label = config["overwrite_map"].get(dl_label, dl_label)
    if score < config["thresholds"].get(dl_label, config["medium_confidence_threshold"]):
        label = "txt" if _kb.get(label, {}).get("is_text") else "unknown"
    return _verdict(label, score)
