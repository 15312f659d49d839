"""The OCR chain (issue #19): an image file's bytes in, its text lines out, through the daemon (ocr_det ->
ocr_cls -> ocr_rec run by the built-in openinfer:rapidocr steps inside the sandboxed chain workers) against
`rapidocr_onnxruntime` in process, on the same images (tests/ocr_images.py: the ones shipped in the installed
packages that hold text, and the rendered lines), same answers.

    .venv/bin/python bench/ocr.py                   # ~2 min: 3 interleaved rounds x 10 s per side
    .venv/bin/python bench/ocr.py --rounds 1 --duration 5       # a quick look
    .venv/bin/python bench/ocr.py --plot-only bench/results/ocr.json   # redraw the plot

Figures (each the median over rounds; the ratio the median of per-round ratios, both sides back to back):
  daemon_images_per_s   2 chain workers (`ocr`, `workers = 2`, each with the three models on their shared
                        weights); 4 client processes, closed loop, each a sync Client sending whole image files
  library_images_per_s  2 processes, each `RapidOCR()(data)` over the same images in turn (its own three
                        onnxruntime sessions, its defaults: one intra-op thread per process, as the daemon's)
  same_lines            images whose text lines were the same on both sides, of those compared
  stage_ms              per model, the median time the chain spent in it per image (the replies' `stages`),
                        and the rest of the request's compute_us: the steps' own work between the models
The issue sets no target for chains; magika's (>= 0.7 x its library, 2 workers vs 2 processes) is the
yardstick. Reported, never asserted. Writes bench/results/ocr.json and ocr.png.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from common import DaemonProcess, add_output_arguments, machine_info, median_of, redrawn, run_together, two_bars, world_readable_copy, write_json  # noqa: E402

CLIENT_PROCESSES = 4
LIBRARY_PROCESSES = 2
WORKERS = 2


def _images() -> dict[str, bytes]:
    """The shipped images that hold text (per the library) and the rendered lines, by name."""
    from ocr_images import rendered_lines, shipped_images
    from rapidocr_onnxruntime import RapidOCR

    library = RapidOCR()
    images = {f"shipped:{path.name}": path.read_bytes() for path in shipped_images()}
    images = {name: data for name, data in images.items() if library(data)[0]}
    images.update({f"rendered:{name}": data for name, data in rendered_lines().items()})
    return images


def _daemon_loop(address: str, images: dict[str, bytes], offset: int, duration: float, out: Any) -> None:
    from openinfer.client import Client

    names = sorted(images)
    done = 0
    lines: dict[str, list[str]] = {}
    stages: dict[str, list[float]] = {}
    with Client(address, timeout=60) as client:
        client.infer("ocr", {"image": images[names[0]]})
        start = time.monotonic()
        i = offset
        while time.monotonic() - start < duration:
            name = names[i % len(names)]
            result = client.infer("ocr", {"image": images[name]})
            lines[name] = [text.decode() for text in result.outputs["text"]]
            for model, stage in (result.stages or {}).items():
                stages.setdefault(model, []).append(stage["compute_us"] / 1000)
            in_models = sum(stage["compute_us"] for stage in (result.stages or {}).values())
            stages.setdefault("(steps: decode, resize, post-process, crops)", []).append((result.timing["compute_us"] - in_models) / 1000)
            done += 1
            i += 1
        out.put((done, time.monotonic() - start, lines, stages))


def _library_loop(images: dict[str, bytes], offset: int, duration: float, out: Any) -> None:
    from rapidocr_onnxruntime import RapidOCR

    names = sorted(images)
    # One intra-op thread per session, as each daemon worker has (examples' intra_op_threads = 1).
    library = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
    library(images[names[0]])
    done = 0
    lines: dict[str, list[str]] = {}
    start = time.monotonic()
    i = offset
    while time.monotonic() - start < duration:
        name = names[i % len(names)]
        found, _ = library(images[name])
        lines[name] = [line[1] for line in found or []]
        done += 1
        i += 1
    out.put((done, time.monotonic() - start, lines, {}))


def _run(target: Any, args_for: list[tuple[Any, ...]]) -> tuple[float, dict[str, list[str]], dict[str, list[float]]]:
    """Processes started together; images per second summed over them, the lines they read, the stages."""
    results = run_together(target, args_for)
    lines: dict[str, list[str]] = {}
    stages: dict[str, list[float]] = {}
    for _, _, seen, spent in results:
        lines.update(seen)
        for model, times in spent.items():
            stages.setdefault(model, []).extend(times)
    return sum(done / elapsed for done, elapsed, _, _ in results), lines, stages


def plot(result: dict[str, Any], path: Path) -> None:
    two_bars(path, ["daemon chain (2 workers)", "rapidocr library (2 processes)"], [result["daemon_images_per_s"], result["library_images_per_s"]],
             "images / s", f"OCR, image -> text lines: x{result['ratio']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    add_output_arguments(parser, BENCH / "results" / "ocr.json")
    args = parser.parse_args(argv)
    if redrawn(args, plot):
        return 0

    images = _images()
    repo = world_readable_copy(["ocr_det", "ocr_cls", "ocr_rec", "ocr"])
    config = (repo / "ocr" / "config.toml").read_text().replace("workers = 1", f"workers = {WORKERS}")
    (repo / "ocr" / "config.toml").write_text(config)
    rounds: list[dict[str, Any]] = []
    stage_times: dict[str, list[float]] = {}
    with DaemonProcess(models=repo, workers=1, label="ocr").start(timeout=180) as daemon:
        for round_index in range(args.rounds):
            order = ["daemon", "library"] if round_index % 2 == 0 else ["library", "daemon"]
            figures: dict[str, Any] = {}
            seen: dict[str, dict[str, list[str]]] = {}
            for side in order:
                if side == "daemon":
                    rate, seen[side], spent = _run(_daemon_loop, [(daemon.address, images, k * 3, args.duration) for k in range(CLIENT_PROCESSES)])
                    for model, times in spent.items():
                        stage_times.setdefault(model, []).extend(times)
                else:
                    rate, seen[side], _ = _run(_library_loop, [(images, k * 3, args.duration) for k in range(LIBRARY_PROCESSES)])
                figures[f"{side}_images_per_s"] = rate
            shared = set(seen["daemon"]) & set(seen["library"])
            figures["same_lines"] = sum(seen["daemon"][name] == seen["library"][name] for name in shared)
            figures["compared"] = len(shared)
            figures["ratio"] = figures["daemon_images_per_s"] / figures["library_images_per_s"]
            rounds.append(figures)
            print(f"round {round_index + 1}: daemon {figures['daemon_images_per_s']:.2f} images/s, library {figures['library_images_per_s']:.2f} images/s, "
                  f"x{figures['ratio']:.2f}, same lines {figures['same_lines']}/{figures['compared']}")
    result = {
        "config": {"rounds": args.rounds, "duration_s": args.duration, "images": len(images), "workers": WORKERS,
                   "client_processes": CLIENT_PROCESSES, "library_processes": LIBRARY_PROCESSES},
        "machine": machine_info(),
        "rounds": rounds,
        "daemon_images_per_s": median_of(r["daemon_images_per_s"] for r in rounds),
        "library_images_per_s": median_of(r["library_images_per_s"] for r in rounds),
        "ratio": median_of(r["ratio"] for r in rounds),
        "same_lines": f"{sum(r['same_lines'] for r in rounds)}/{sum(r['compared'] for r in rounds)}",
        "stage_ms": {model: median_of(times) for model, times in stage_times.items()},
        "yardstick": {"ratio": ">= 0.7 (magika's target)"},
    }
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"daemon {result['daemon_images_per_s']:.2f} images/s vs library {result['library_images_per_s']:.2f}: x{result['ratio']:.2f}; "
          f"same lines {result['same_lines']}; per model (median ms per image): {', '.join(f'{m} {t:.1f}' for m, t in result['stage_ms'].items())}")
    shutil.rmtree(repo, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
