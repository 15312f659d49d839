"""Images to read text from, for the OCR chain's tests (tests/test_steps_rapidocr.py) and its benchmark
(bench/ocr.py): the PNG and JPEG files shipped inside the installed packages - scikit-image's data (a scanned
page of text among them), matplotlib's sample data, networkx's and sympy's test baselines: images nobody
here made - and lines rendered here with Pillow's own font to reach each branch of the pipeline (upside
down, vertical, very wide, tiny, huge, grey, RGBA, JPEG)."""
from __future__ import annotations

import io
import sysconfig
from pathlib import Path


def shipped_images() -> list[Path]:
    """Every PNG and JPEG of 2 KiB or more inside the installed packages, in a stable order."""
    root = Path(sysconfig.get_paths()["purelib"])
    found = [p for pattern in ("*.png", "*.jpg", "*.jpeg") for p in root.rglob(pattern) if p.stat().st_size >= 2048]
    return sorted(found, key=lambda p: str(p.relative_to(root)))


def rendered(text: str, *, size: tuple[int, int] = (700, 80), font_size: int = 36, turn: int = 0, mode: str = "RGB", fmt: str = "PNG", scale: float = 1.0) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, (size[1] - font_size) // 2), text, fill="black", font=ImageFont.load_default(size=font_size))
    if turn:
        image = image.rotate(turn, expand=True, fillcolor="white")
    if scale != 1.0:
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def rendered_lines() -> dict[str, bytes]:
    """One image per branch of the pipeline, by name."""
    return {
        "line": rendered("Inference behind a sandbox, 2026"),
        "upside_down": rendered("Classified and turned back", turn=180),
        "vertical": rendered("Read sideways", turn=90),
        "very_wide": rendered("a very wide line " * 6, size=(4200, 60), font_size=30),
        "tiny": rendered("tiny", size=(60, 20), font_size=12),
        "huge": rendered("scaled down first", size=(2600, 400), font_size=120),
        "grey": rendered("Grey scale text", mode="L"),
        "rgba": rendered("Transparent background", mode="RGBA"),
        "jpeg": rendered("Compressed with JPEG", fmt="JPEG"),
    }
