"""Realistic, valid inputs for the example models shipped under `examples/models/`.

Only numpy is needed. Every call builds fresh arrays (callers may modify them),
and the values are deterministic, so tests can compare outputs between runs.

    >>> from examples.sample_inputs import sample_inputs
    >>> feeds = sample_inputs("silero_vad")
    >>> sorted(feeds)
    ['input', 'sr', 'state']

See `examples/MODELS.md` for where each model comes from and what it expects.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

MODELS_DIR: Path = Path(__file__).resolve().parent / "models"
"""A model repository root: `<MODELS_DIR>/<name>/1/model.onnx` plus `<name>/config.toml`."""

# --- silero_vad -------------------------------------------------------------

SILERO_SAMPLE_RATE = 16_000
SILERO_CHUNK = 512  # new samples per call at 16 kHz (256 at 8 kHz)
SILERO_CONTEXT = 64  # the last samples of the previous chunk, prepended (32 at 8 kHz)


def _silero_vad() -> dict[str, np.ndarray]:
    """One 16 kHz streaming step: 64 samples of (silent) context + 512 new samples.

    The new samples are a synthetic voiced sound: a 140 Hz glottal pulse train
    (harmonics falling off at 12 dB/octave) shaped by three formant peaks of the
    vowel /a/, plus a little noise. `state` is the zero state of a new stream.
    """
    t = np.arange(SILERO_CHUNK, dtype=np.float64) / SILERO_SAMPLE_RATE
    f0 = 140.0
    voiced = np.zeros(SILERO_CHUNK, dtype=np.float64)
    for k in range(1, int(4000 // f0)):
        freq = k * f0
        formants = sum(
            gain / (1.0 + ((freq - centre) / width) ** 2)
            for centre, width, gain in ((700.0, 130.0, 1.0), (1220.0, 170.0, 0.5), (2600.0, 250.0, 0.25))
        )
        voiced += formants / k**2 * np.sin(2.0 * np.pi * freq * t + 0.3 * k)
    voiced *= 0.3 / np.max(np.abs(voiced))
    voiced += 0.003 * np.random.default_rng(0).standard_normal(SILERO_CHUNK)
    chunk = np.concatenate([np.zeros(SILERO_CONTEXT), voiced])
    return {
        "input": chunk.astype(np.float32)[np.newaxis, :],  # [batch=1, 576]
        "state": np.zeros((2, 1, 128), dtype=np.float32),  # [2, batch, 128]
        "sr": np.array(SILERO_SAMPLE_RATE, dtype=np.int64),  # rank 0 (a scalar), not shape [1]
    }


# --- magika -----------------------------------------------------------------

MAGIKA_BLOCK_SIZE = 4096
MAGIKA_BEG_SIZE = 1024
MAGIKA_END_SIZE = 1024
MAGIKA_PADDING_TOKEN = 256

_MAGIKA_SAMPLE = b'''#!/usr/bin/env python3
"""Print every line of standard input in upper case."""
import sys


def main() -> int:
    for line in sys.stdin:
        print(line.rstrip("\\n").upper())
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def magika_features(content: bytes) -> np.ndarray:
    """Magika's model input for one file's bytes: int32 of shape [2048].

    As magika 1.0.3 does for its `standard_v3_3` model: read at most 4096 bytes
    from the start and from the end; strip leading (start) / trailing (end)
    ASCII whitespace; keep the first 1024 / last 1024 byte values, padding with
    the token 256 (after the start bytes, before the end bytes). Magika itself
    skips the model for files under 8 bytes.
    """
    head = content[:MAGIKA_BLOCK_SIZE].lstrip()[:MAGIKA_BEG_SIZE]
    tail = content[-MAGIKA_BLOCK_SIZE:].rstrip()[-MAGIKA_END_SIZE:] if content else b""
    beg = np.full(MAGIKA_BEG_SIZE, MAGIKA_PADDING_TOKEN, dtype=np.int32)
    beg[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    end = np.full(MAGIKA_END_SIZE, MAGIKA_PADDING_TOKEN, dtype=np.int32)
    end[MAGIKA_END_SIZE - len(tail) :] = np.frombuffer(tail, dtype=np.uint8)
    return np.concatenate([beg, end])


def _magika() -> dict[str, np.ndarray]:
    """A small Python script (the model's top label for it is `python`)."""
    return {"bytes": magika_features(_MAGIKA_SAMPLE)[np.newaxis, :]}  # [batch=1, 2048] int32


# --- PaddleOCR (RapidOCR) ---------------------------------------------------


def _text_image(height: int, width: int, rows: tuple[tuple[int, int], ...], x_end: int) -> np.ndarray:
    """A white uint8 BGR image, [height, width, 3], with dark glyph-like marks.

    Each row `(top, glyph_height)` gets a line of 'letters' (5-7 px wide
    strokes with 3 px gaps and a space every fifth letter) up to column `x_end`.
    """
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    for top, glyph_height in rows:
        x, letter = 3, 0
        while x < x_end - 3:
            w = 5 + (letter * 7) % 3
            if letter % 5 != 4:  # every fifth letter is a space
                img[top : top + glyph_height, x : x + w] = 25
                img[top + glyph_height // 3 : top + 2 * glyph_height // 3, x + 1 : x + w - 1] = 240
            x += w + 3
            letter += 1
    return img


def _ocr_normalize(img: np.ndarray) -> np.ndarray:
    """HWC uint8 BGR -> CHW float32 in [-1, 1], as RapidOCR does: (x / 255 - 0.5) / 0.5."""
    chw = img.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (chw - np.float32(0.5)) / np.float32(0.5)


def _ocr_det() -> dict[str, np.ndarray]:
    """A 64x96 page with two lines of dark text on white; [1, 3, 64, 96] float32.

    H and W must be multiples of 32 for this model (RapidOCR resizes to that);
    other sizes fail inside the model with a broadcast error.
    """
    img = _text_image(64, 96, rows=((14, 12), (38, 12)), x_end=90)
    return {"x": _ocr_normalize(img)[np.newaxis]}


def _ocr_cls() -> dict[str, np.ndarray]:
    """One cropped text line in RapidOCR's classifier layout; [1, 3, 48, 192] float32.

    A 48x144 line of text normalised to [-1, 1], then right-padded with 0.0
    to width 192, as RapidOCR's `resize_norm_img` does.
    """
    line = _ocr_normalize(_text_image(48, 144, rows=((12, 24),), x_end=144))
    padded = np.zeros((3, 48, 192), dtype=np.float32)
    padded[:, :, :144] = line
    return {"x": padded[np.newaxis]}


# --- lookup -----------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "silero_vad": _silero_vad,
    "magika": _magika,
    "ocr_det": _ocr_det,
    "ocr_cls": _ocr_cls,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def sample_inputs(model_name: str) -> dict[str, np.ndarray]:
    """A valid, realistic input feed for the shipped example model `model_name`.

    Raises KeyError for a name that is not one of `MODEL_NAMES`.
    """
    try:
        builder = _BUILDERS[model_name]
    except KeyError:
        raise KeyError(f"no sample input for model {model_name!r}; known: {', '.join(MODEL_NAMES)}") from None
    return builder()
