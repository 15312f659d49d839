"""The built-in silero_vad steps (examples/models/speech_segments): PCM samples of any length in, speech
segments out, equal to the `silero_vad` package's own `get_speech_timestamps` run in process on the same
samples - on real speech nobody here recorded: sentences spoken by espeak-ng (Debian), in two voices,
with pauses and a little noise, at 16 kHz, 8 kHz and 48 kHz."""
from __future__ import annotations

import shutil
import subprocess
import warnings
import wave
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon
from openinfer.client import Client, OpenInferError
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

ESPEAK = shutil.which("espeak-ng")
SENTENCES = [
    ("en", "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."),
    ("en-us", "Security appliances inspect every attachment before it reaches a mailbox."),
    ("de", "Guten Morgen, heute ist ein schoener Tag fuer einen langen Spaziergang."),
]


def spoken(voice: str, text: str, directory: Path) -> tuple[np.ndarray, int]:
    """espeak-ng's speech as float32 samples and their rate (22050 Hz)."""
    path = directory / f"{voice}.wav"
    subprocess.run([ESPEAK or "espeak-ng", "-v", voice, "-s", "150", "-w", str(path), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(path)) as wav:
        assert wav.getsampwidth() == 2 and wav.getnchannels() == 1
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
        return samples, wav.getframerate()


def resampled(samples: np.ndarray, rate: int, to: int) -> np.ndarray:
    times = np.arange(int(len(samples) * to / rate)) / to
    return np.interp(times, np.arange(len(samples)) / rate, samples).astype(np.float32)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> dict[int, np.ndarray]:
    """Three sentences with pauses between them (0.3-0.9 s) and faint noise, at each rate."""
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed (tests/run.sh installs it from Debian when run as root)")
    directory = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(5)
    parts: list[np.ndarray] = []
    rate = 22050
    for pause, (voice, text) in zip((0.6, 0.9, 0.3), SENTENCES):
        parts.append(np.zeros(int(pause * rate), np.float32))
        samples, rate = spoken(voice, text, directory)
        parts.append(samples)
    parts.append(np.zeros(int(0.5 * rate), np.float32))
    speech = np.concatenate(parts)
    speech = speech + rng.normal(0, 0.002, len(speech)).astype(np.float32)
    sixteen = resampled(speech, rate, 16000)
    return {16000: sixteen, 8000: np.ascontiguousarray(sixteen[::2]), 48000: resampled(speech, rate, 48000)}


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    repo = ModelRepo("oi-steps-silero-")
    repo.examples(["speech_segments", "silero_vad"])
    running = start_daemon(repo.ready())
    yield running
    running.stop()
    cleanup_workdir(running)
    repo.remove()


def library_segments(audio: np.ndarray, rate: int) -> list[list[int]]:
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    model = load_silero_vad(onnx=True)
    with warnings.catch_warnings():  # at 48 kHz it warns that it decimates to 16 kHz, as the steps do
        warnings.simplefilter("ignore", UserWarning)
        return [[int(s["start"]), int(s["end"])] for s in get_speech_timestamps(torch.from_numpy(audio), model, sampling_rate=rate)]


@pytest.mark.parametrize("rate", [16000, 8000, 48000])
def test_speech_segments_equal_the_silero_vad_library(daemon: RunningDaemon, recording: dict[int, np.ndarray], rate: int) -> None:
    audio = recording[rate]
    want = library_segments(audio, rate)
    assert len(want) >= 2, want  # real pauses: the library itself finds several segments
    with Client(daemon.address, timeout=60) as client:
        got = client.infer("speech_segments", {"audio": audio, "sampling_rate": np.array(rate, np.int64)}).outputs["segments"]
    assert got.dtype == np.int64 and got.tolist() == want


def test_short_and_empty_audio_and_the_front_door(daemon: RunningDaemon, recording: dict[int, np.ndarray]) -> None:
    audio = recording[16000]
    cases = [audio[:3000], audio[:700], audio[:0], audio[16000:40000]]
    with Client(daemon.address, timeout=60, direct=False) as client:
        for clip in cases:
            got = client.infer("speech_segments", {"audio": clip, "sampling_rate": np.array(16000, np.int64)}).outputs["segments"]
            assert got.shape[1:] == (2,) and got.tolist() == library_segments(clip, 16000), len(clip)
        with pytest.raises(OpenInferError) as caught:  # the caller's mistake, named by the step
            client.infer("speech_segments", {"audio": audio[:1000], "sampling_rate": np.array(44100, np.int64)})
        assert caught.value.code == "INVALID_ARGUMENT" and "the drive step of openinfer:silero_vad failed: ValueError: sampling_rate 44100" in str(caught.value)
