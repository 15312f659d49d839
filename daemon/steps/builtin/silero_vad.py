"""Silero VAD (snakers4/silero-vad, the package's default ONNX model): PCM samples of any length in,
speech segments out - what `silero_vad.get_speech_timestamps(audio, model, sampling_rate=sr)` answers
with its defaults (silero-vad 6.2.3), computed inside the sandboxed worker without torch.

The model takes one window at a time (512 samples at 16 kHz, 256 at 8 kHz) after the last 64 (32)
samples of the previous window, and carries a recurrent state: this step drives it window by window
(the last one zero-padded), then turns the speech probabilities into segments: speech starts at a window
whose probability reaches 0.5, ends once it stays under 0.35 for 100 ms, segments shorter than 250 ms
are dropped, and each is padded by 30 ms (halving shorter gaps). Rates that are multiples of 16 kHz are
decimated to 16 kHz and the segments given back in the input's samples."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

INPUTS = [
    {"name": "audio", "datatype": "FP32", "shape": [-1]},  # mono samples in [-1, 1]
    {"name": "sampling_rate", "datatype": "INT64", "shape": []},  # 8000, 16000 or a multiple of 16000
]
OUTPUTS = [{"name": "segments", "datatype": "INT64", "shape": [-1, 2]}]  # [start, end) in input samples

THRESHOLD = 0.5
NEG_THRESHOLD = max(THRESHOLD - 0.15, 0.01)
MIN_SPEECH_MS = 250
MIN_SILENCE_MS = 100
SPEECH_PAD_MS = 30


def drive(inputs: dict[str, np.ndarray], model: Callable[[dict[str, Any]], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    audio = np.ascontiguousarray(inputs["audio"], dtype=np.float32).reshape(-1)
    rate = int(inputs["sampling_rate"])
    step = 1
    if rate > 16000 and rate % 16000 == 0:
        step, rate = rate // 16000, 16000
        audio = audio[::step]
    if rate not in (8000, 16000):
        raise ValueError(f"sampling_rate {int(inputs['sampling_rate'])}: Silero VAD takes 8000, 16000 or a multiple of 16000")
    probabilities = _speech_probabilities(audio, rate, model)
    segments = _segments(probabilities, rate, len(audio))
    return {"segments": np.array(segments, dtype=np.int64).reshape(-1, 2) * step}


def _speech_probabilities(audio: np.ndarray, rate: int, model: Callable[[dict[str, Any]], dict[str, np.ndarray]]) -> list[float]:
    window = 512 if rate == 16000 else 256
    context_size = 64 if rate == 16000 else 32
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(context_size, np.float32)
    sr = np.array(rate, np.int64)
    probabilities = []
    for start in range(0, len(audio), window):
        chunk = audio[start : start + window]
        if len(chunk) < window:
            chunk = np.concatenate([chunk, np.zeros(window - len(chunk), np.float32)])
        framed = np.concatenate([context, chunk])
        out = model({"input": framed[np.newaxis, :], "state": state, "sr": sr})
        state = out["stateN"]
        context = framed[-context_size:]
        probabilities.append(float(out["output"].reshape(-1)[0]))
    return probabilities


def _segments(probabilities: list[float], rate: int, length: int) -> list[tuple[int, int]]:
    window = 512 if rate == 16000 else 256
    min_speech = rate * MIN_SPEECH_MS / 1000
    min_silence = rate * MIN_SILENCE_MS / 1000
    pad = rate * SPEECH_PAD_MS / 1000
    found: list[list[float]] = []
    speaking = False
    start = 0.0
    silence_from = 0  # where the current run of quiet windows began (0: none)
    for index, probability in enumerate(probabilities):
        at = window * index
        if probability >= THRESHOLD and silence_from:
            silence_from = 0  # speech again before the silence was long enough
        if probability >= THRESHOLD and not speaking:
            speaking, start = True, at
            continue
        if speaking and probability < NEG_THRESHOLD:
            if not silence_from:
                silence_from = at
            if at - silence_from < min_silence:
                continue
            if silence_from - start > min_speech:
                found.append([start, silence_from])
            speaking, silence_from = False, 0
    if speaking and length - start > min_speech:
        found.append([start, length])
    for index, segment in enumerate(found):
        if index == 0:
            segment[0] = int(max(0, segment[0] - pad))
        if index != len(found) - 1:
            gap = found[index + 1][0] - segment[1]
            if gap < 2 * pad:
                segment[1] += int(gap // 2)
                found[index + 1][0] = int(max(0, found[index + 1][0] - gap // 2))
            else:
                segment[1] = int(min(length, segment[1] + pad))
                found[index + 1][0] = int(max(0, found[index + 1][0] - pad))
        else:
            segment[1] = int(min(length, segment[1] + pad))
    return [(int(a), int(b)) for a, b in found]
