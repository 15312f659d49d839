"""Start the daemon on examples/models, call it with the Python client, print what the models say."""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from examples.sample_inputs import magika_features, sample_inputs  # noqa: E402
from openinfer.client import Client, OpenInferError  # noqa: E402


def wait_ready(client: Client, daemon: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"daemon exited with {daemon.returncode}")
        try:
            if client.health()["ready"]:
                return
        except OpenInferError:
            pass
        time.sleep(0.1)
    raise SystemExit("daemon not ready in time")


def rendered_line(text: str) -> bytes:
    """A PNG of one line of black text on white (Pillow comes with the `ocr` extra)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (900, 360), "white")  # detection scales the short side up to 736 px: not too flat
    ImageDraw.Draw(image).text((20, 150), text, fill="black", font=ImageFont.load_default(size=40))
    png = io.BytesIO()
    image.save(png, format="PNG")
    return png.getvalue()


def main() -> int:
    socket_dir = Path(tempfile.mkdtemp(prefix="openinfer-quickstart-"))
    address = f"ipc://{socket_dir}/openinfer.sock"
    log = open(socket_dir / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "openinfer.daemon.cli", "serve", "--models", str(HERE / "models"), "--socket", address],
        stderr=log,
    )
    try:
        with Client(address, client_name="quickstart") as client:
            wait_ready(client, daemon)
            print(f"daemon ready at {address} (log: {socket_dir / 'daemon.log'})\n")
            # magika's steps run inside its sandboxed worker: send a file's bytes, get its content type.
            for path in (Path(__file__), HERE / "MODELS.md", HERE / "models" / "silero_vad" / "LICENSE", Path(sys.executable).resolve()):
                verdict = client.infer("magika", {"bytes": path.read_bytes()})
                label, group, score = (verdict.outputs[k].item() for k in ("label", "group", "score"))
                print(f"magika: {path.name:<16} -> {label.decode():<10} {group.decode():<11} ({score:.3f})   total {verdict.timing['total_us']:.0f} µs")
            again = client.infer("magika", {"bytes": Path(__file__).read_bytes()})
            print(f"magika: {Path(__file__).name:<16} again -> cache {again.cache}, total {again.timing['total_us']:.0f} µs (nothing ran)")
            scores = client.infer("magika_scores", {"bytes": magika_features(Path(__file__).read_bytes())[np.newaxis, :]}).outputs["target_label"][0]
            print(f"magika_scores (the same model, tensors in and out): {len(scores)} scores, best {scores.max():.3f}")
            vad = client.infer("silero_vad", sample_inputs("silero_vad"))
            print(f"silero_vad: speech probability of a synthetic vowel = {float(vad.outputs['output'][0, 0]):.3f}")
            det = client.infer("ocr_det", sample_inputs("ocr_det"))
            mask = det.outputs["sigmoid_0.tmp_0"]
            print(f"ocr_det: {int((mask > 0.3).sum())} text pixels found in a {mask.shape[2]}x{mask.shape[3]} image")
            # The OCR chain: three models (detect, classify, recognise) run as one request in one sandboxed worker.
            lines = client.infer("ocr", {"image": rendered_line("Sandboxed OCR: one request, three models")})
            read = [text.decode() for text in lines.outputs["text"]]
            spent = ", ".join(f"{name} {stage['compute_us'] / 1000:.0f} ms" for name, stage in (lines.stages or {}).items())
            print(f"ocr: read {read} from a rendered PNG   ({spent})")
            tiny = client.infer("tiny", {"x": np.ones((1, 64), np.float32)})
            print(f"tiny: y[:4] = {tiny.outputs['y'][0, :4]}   timing: {', '.join(f'{k}={v:.0f}' for k, v in tiny.timing.items())} (µs)")
            status = client.status()
            print(f"\n{len(status['workers'])} sandboxed workers: " + ", ".join(f"{w['model']} pid {w['pid']} seccomp={w['sandbox'].get('seccomp_mode', 'off')}" for w in status["workers"]))
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print(f"daemon stopped (exit {code})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
