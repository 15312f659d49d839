"""RapidOCR (PaddleOCR PP-OCRv4 det, mobile v2.0 cls, PP-OCRv4 rec, as `rapidocr_onnxruntime` 1.4.4 ships
them): an image file's bytes (PNG, JPEG, BMP, TIFF, WebP, GIF) in, its text lines out - what `RapidOCR()(image_bytes)` answers with its
default settings, computed inside the chain's sandboxed worker by the chain's three models.

The chain (examples/models/ocr) names its models in the order detection, direction classification,
recognition. The image is decoded here, in the sandbox (Pillow, opened once with the formats allowed,
converted by the library's own loader): a hostile image file meets the same seccomp policy, uid, Landlock
and memory limit as a hostile model.
Detection: the image is scaled so its sides are multiples of 32 and its short side is at least 736,
normalised, run; the probability map is thresholded into boxes (the library's DB post-processing).
Each box is cut out (perspective warp), turned when tall, classified (upside-down lines with a score
over 0.9 are rotated), and recognised in batches of 6 sorted by aspect ratio (CTC decoding over the
model's character list, `ppocr_keys.txt` beside config.toml, read once at setup). Lines scoring under
0.5 are dropped; boxes are given in the input image's pixels.

The image decoding and the DB / CTC post-processing are the published library's own classes (installed
by `pip install 'openinfer[ocr]'`: Pillow, OpenCV, pyclipper, shapely); the order of the stages, the
crops and the batching are written here, from the library's documented pipeline."""
from __future__ import annotations

import io
import math
import re
import struct
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

from openinfer.daemon.steps.cpu_budget import OverBudget, cpu_budget

FILES = ("ppocr_keys.txt",)  # the recognition model's characters, one per line (its metadata's `character`)
INPUTS = [{"name": "image", "datatype": "BYTES", "shape": []}]  # an image file: PNG, JPEG, BMP, TIFF, WebP or GIF
OUTPUTS = [
    {"name": "text", "datatype": "BYTES", "shape": [-1]},  # one UTF-8 line per box, top to bottom, left to right
    {"name": "score", "datatype": "FP32", "shape": [-1]},  # the recognition's mean character confidence
    {"name": "box", "datatype": "FP32", "shape": [-1, 4, 2]},  # corners (x, y): top-left, top-right, bottom-right, bottom-left
]

MAX_SIDE = 2000  # larger images are scaled down first
MIN_SIDE = 30
MIN_HEIGHT = 30  # shorter (or wider than 8:1) images get black bands above and below
WIDTH_HEIGHT_RATIO = 8
DET_LIMIT_SIDE = 736
DET_MEAN = DET_STD = (0.5, 0.5, 0.5)
CLS_SHAPE = (3, 48, 192)
CLS_BATCH = 6
CLS_THRESHOLD = 0.9
REC_SHAPE = (3, 48, 320)
REC_BATCH = 6
TEXT_SCORE = 0.5
MAX_PIXELS = 64 * 1024 * 1024  # a larger image (a decompression bomb) is refused from its header, not decoded
# Scans of a progressive JPEG, each decoded over the whole image (4.5 ms a scan at MAX_PIXELS here): one
# 99-byte scan repeated 8000 times in a 1 MB file held the chain's worker for all of max_compute_ms (20 s)
# and got it killed, every time (round 44). Encoders write about 10 (libjpeg's progressive script: 10 for
# colour, 6 for grey); libjpeg-turbo's own tools offer a limit of 500 for untrusted files.
MAX_JPEG_SCANS = 32
MAX_TIFF_STRIPS = 65536  # an 8192-row image in one-row strips has 8192; 256x256 tiles of 8192x8192, 1024
MAX_JPEG_FILL = 65536  # fill bytes (FF), escaped FFs and junk before a JPEG's first scan
MAX_JPEG_SEGMENTS = 1024  # markers before the first scan: an honest file has a few dozen (ICC in up to 255 chunks)
_TIFF_LAYOUT_TAGS = frozenset({256, 257, 273, 277, 278, 279, 284, 322, 323, 324, 325})  # sizes, strips, tiles, planes
TIFF_PREFIXES = frozenset({b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00"})  # Pillow's own
_FF_RUN = re.compile(rb"\xff+")
_JUNK_RUN = re.compile(rb"[^\xff]+")
# What opening and decoding a file may cost, in the worker's CPU time (cpu_budget.py): the layout checks
# below refuse the slow layouts the attackers found, with a reason; these bound the ones not found yet
# (each round 44-49 found another within 16 MiB, 4-80 s of one worker). Opening reads the header: an
# honest one takes 0.2-8 ms here, at any size. Decoding is worth its pixels: the slowest honest files of
# MAX_PIXELS measured here take 60-75 ns a pixel (a noisy RGBA PNG, WebP; JPEG 27-37, TIFF 8-25), 2x that
# is allowed, so a 64x64 file gets 0.25 s and the largest image ~10 s (max_compute_ms is 20 s).
OPEN_CPU_S = 0.5
DECODE_CPU_S = 0.25
DECODE_CPU_S_PER_PIXEL = 150e-9
# TIFF compressions decoded once per pixel: none, CCITT 1D/T.4/T.6, LZW, Deflate (Adobe's and the old
# code), PackBits. Not JPEG (6, 7) nor the others libtiff may be built with (WebP, ZSTD, LERC, JBIG, ...).
TIFF_COMPRESSIONS = frozenset({1, 2, 3, 4, 5, 8, 32773, 32946})
# The most pixels the reading may grow an image to: its short side is scaled up to MIN_SIDE, a wide image
# padded to a quarter of its width in height, the short side of that scaled up to DET_LIMIT_SIDE. An
# 81-byte 1999x1 PNG grew to 15000x60000 (2.7 GB) and failed INTERNAL after seconds of the chain's worker
# (round 24). The detection model on 8 Mi pixels peaks at ~1.7 GiB and 4 s here (2.2x the largest a page
# up to 2000x2000 gives); on 16 Mi, ~3 GiB - most of a worker's default 4 GiB.
MAX_WORK_PIXELS = 8 * 1024 * 1024
# The raster formats Pillow decodes in process, and nothing else: Pillow would hand an EPS or PDF to
# Ghostscript in a new process, which the serve policy answers by killing the worker (SIGSYS), so a client
# could crash-loop the chain with one file; the rarer decoders are attack surface nobody here needs.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")

_library: dict[str, Any] = {}

# Imported when the worker imports this built-in, before it drops to the worker user (worker/boot.py,
# _preload_builtin_steps): the Python installation may be unreadable to that user.
try:
    import cv2
    from PIL import Image, UnidentifiedImageError
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess, DetPreProcess
    from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode
    from rapidocr_onnxruntime.utils.load_image import LoadImage

    from PIL.JpegImagePlugin import MARKER

    Image.init()  # every image format's plugin now: Pillow imports them at the first open otherwise
    # The second byte of each marker Pillow's JPEG open knows -> whether its handler reads a segment after it.
    _JPEG_MARKERS = {code & 0xFF: handler is not None for code, (_, _, handler) in MARKER.items()}
    _missing = None
except ImportError as exc:
    _missing = exc


def setup(files: dict[str, bytes]) -> None:
    if _missing is not None:
        raise RuntimeError(f"openinfer:rapidocr needs the rapidocr_onnxruntime package and its image libraries: pip install 'openinfer[ocr]' ({_missing})")
    cv2.setNumThreads(0)  # no thread pool of its own: a request uses the threads the model's intra_op_threads gives it, no more
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # a second line behind _refuse_too_many_pixels: Pillow raises DecompressionBombError beyond twice this
    characters = files["ppocr_keys.txt"].decode("utf-8").splitlines()
    _library.update(
        cv2=cv2,
        load=LoadImage(),
        det_pre=DetPreProcess(DET_LIMIT_SIDE, "min", list(DET_MEAN), list(DET_STD)),
        det_post=DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6, score_mode="fast", use_dilation=True),
        decode=CTCLabelDecode(character=characters),
    )


Model = Callable[[dict[str, Any]], dict[str, np.ndarray]]


def drive(inputs: dict[str, Any], models: dict[str, Model]) -> dict[str, Any]:
    if len(models) != 3:
        raise RuntimeError(f"openinfer:rapidocr runs a chain of three models (detection, classification, recognition); this chain has {list(models)}")
    detect, classify, recognise = models.values()
    image = _decode(inputs["image"])
    raw_h, raw_w = image.shape[:2]
    _refuse_too_thin(raw_h, raw_w)
    image, ratio_h, ratio_w = _fit_sides(image)
    image, top = _letterbox(image)
    boxes = _detect(image, detect)
    if not len(boxes):
        return _lines([], [], np.zeros((0, 4, 2), np.float32))
    boxes = _reading_order(boxes)
    crops = _classify([_crop(image, box) for box in boxes], classify)
    texts = _recognise(crops, recognise)
    corners = _original_points(np.array(boxes, np.float32), top, ratio_h, ratio_w, raw_h, raw_w)
    kept = [i for i, (_, score) in enumerate(texts) if float(score) >= TEXT_SCORE]
    return _lines([texts[i][0] for i in kept], [float(texts[i][1]) for i in kept], corners[kept] if kept else np.zeros((0, 4, 2), np.float32))


def _lines(texts: list[str], scores: list[float], boxes: np.ndarray) -> dict[str, Any]:
    text = np.empty(len(texts), dtype=object)
    text[:] = [t.encode("utf-8") for t in texts]
    return {"text": text, "score": np.array(scores, np.float32), "box": boxes.astype(np.float32).reshape(-1, 4, 2)}


def _decode(value: Any) -> np.ndarray:
    """The image file's pixels as BGR, as the library loads bytes; what cannot be decoded is the caller's.

    The file is opened once, with FORMATS only, and the image checked is the image decoded: the library's
    loader, given the bytes, would open them again with every Pillow plugin in `Image.ID` order, and a file
    that is a small JPEG to FORMATS can be an 11000x11000 FLI to that (a JPEG comment whose length makes
    bytes 4-5 FLI's magic, its body an FLI header). Given the opened image, the loader converts it exactly
    as it converts the bytes (np.array of it, "1" as "L", RGB to BGR, alpha flattened)."""
    data = value.item() if isinstance(value, np.ndarray) else value
    if not isinstance(data, bytes) or not data:
        raise ValueError("`image` must be the bytes of an image file (PNG, JPEG, ...)")
    try:
        with cpu_budget(OPEN_CPU_S):
            first_scan = _refuse_costly_layout(data)
            with _callers_file(), warnings.catch_warnings():
                # Pillow warns (on the worker's stderr) of what is over MAX_PIXELS but not twice it: refused next.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # A TIFF tag whose data the file does not hold is skipped by Pillow and read by libtiff, which decodes
                # the strips by its own parse (round 46: a later copy of the strip tables, harmless, was all Pillow
                # saw): no honest writer makes one, and two parsers must not disagree on what is decoded.
                warnings.filterwarnings("error", message="Tag data larger than file")
                opened = Image.open(io.BytesIO(data), formats=FORMATS)  # the header only so far: which format, how large
    except OverBudget:
        raise ValueError(f"`image` took more than {OPEN_CPU_S:g} s of CPU to open (its header alone, before any pixel): refused, not decoded") from None
    with opened:
        _refuse_too_many_pixels(*opened.size)
        width, height = opened.size
        _refuse_too_thin(height, width)  # before the decode too: a 1x4Mi TIFF of 4 Mi strips decoded for 24 s first (round 47)
        budget = DECODE_CPU_S + DECODE_CPU_S_PER_PIXEL * width * height
        try:
            with cpu_budget(budget):
                _refuse_costly_decode(opened, data, first_scan)
                with _callers_file():
                    image = _library["load"](opened)  # decodes this image, in this format: never the bytes again
        except OverBudget:
            raise ValueError(f"`image` took more than {budget:.2f} s of CPU to decode its {width}x{height} pixels: refused") from None
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"`image` decodes to pixels of shape {list(image.shape)}; an image with at least one pixel is needed")
    return np.ascontiguousarray(image)


def _refuse_too_many_pixels(width: int, height: int) -> None:
    """Before any pixel is decoded: Pillow's own check (MAX_IMAGE_PIXELS) only raises beyond twice its
    limit and merely warns below, so an image of 1x to 2x MAX_PIXELS - a few hundred KB of PNG or TIFF in
    a costly mode (F, RGBA, I;16) - would be decoded and hold the chain's worker for seconds."""
    if width * height > MAX_PIXELS:
        raise ValueError(f"`image` is {width}x{height} = {width * height} pixels, more than the {MAX_PIXELS} this step decodes: refused, not decoded")


def _refuse_costly_decode(opened: Any, data: bytes, first_scan: int) -> None:
    """Once Pillow has opened the file, before it decodes a pixel: what its decoders would spend far more
    on than the pixels' worth (the layouts its open itself reads slowly are refused before it, in
    _refuse_costly_layout). A JPEG's (or an MPO's: a JPEG with an MPF segment, frame 0 decoded
    alike - round 45) start-of-scan markers (FF DA), at most MAX_JPEG_SCANS. Counted from the first scan
    on (the whole file when the header walk did not reach one): in entropy-coded data an FF is always
    followed by 00 or a restart marker, so none hides there, while a megabyte of ICC profile or EXIF before it
    holds FF DA pairs by chance (round 49: a progressive JPEG with a 3 MB profile was refused as 53 scans). A TIFF is read only
    in a compression decoded once per pixel: not JPEG-in-TIFF, whose strips libtiff decodes by tables it
    parses itself - rounds 45 and 46 held the worker 14-20 s with 7.7 KB-1.6 MB files the count of
    Pillow's tables passed (strips sharing one 99-scan JPEG, tables Pillow skipped and libtiff read, a last
    strip's JPEG far taller than the strip). No run-length encoded BMP: Pillow decodes it in Python."""
    if opened.format == "TIFF":
        compression = opened.tag_v2.get(259, 1)
        if compression not in TIFF_COMPRESSIONS:
            raise ValueError(f"`image` is a TIFF of compression {compression}: this step reads TIFF uncompressed, CCITT, LZW, PackBits or Deflate only (a JPEG-compressed one: send the JPEG itself)")
        return
    if opened.format == "BMP" and opened.info.get("compression", 0) in (1, 2):
        # Pillow's RLE decoder is Python, a byte at a time: a 33 KB 8192x8192 RLE8 file of end-of-line codes
        # took 10 s and left the worker holding 1 GB (round 47).
        raise ValueError("`image` is a run-length encoded BMP: this step reads uncompressed BMP only")
    if opened.format not in ("JPEG", "MPO"):
        return
    scans = data.count(b"\xff\xda", first_scan)
    if scans > MAX_JPEG_SCANS:
        raise ValueError(f"`image` is a JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} this step decodes (each is decoded over the whole image): refused, not decoded")


def _refuse_costly_layout(data: bytes) -> int:
    """Before Pillow opens the file: what Pillow's open reads in Python, per byte or per entry (round 47:
    each of these held the worker past max_compute_ms). A JPEG's header, walked as Pillow walks it: fill
    bytes (FF FF before a marker: 60 MiB of them after a 64x64 JPEG) and segments before the first scan
    (16 MiB of empty APP0s, FF 00 pairs). A TIFF's strips or tiles beyond what its image has: Pillow makes
    a tile of each offset listed, wrapping past the image's end (a 64x64 image of 4 Mi one-row strips all
    the same 64 bytes)."""
    if data[:2] == b"\xff\xd8":
        return _refuse_costly_jpeg_header(data)
    if data[:4] in TIFF_PREFIXES:
        if data[2:4] in (b"\x00+", b"+\x00"):
            raise ValueError("`image` is a BigTIFF: this step reads classic TIFF only")
        _refuse_extra_strips(data)
    return 0


def _refuse_costly_jpeg_header(data: bytes) -> int:
    """The bytes before the first scan, as Pillow's open walks them a turn of its loop at a time (a jump
    per run or segment here, the runs matched in C): a non-FF byte is junk it skips, FF FF a fill byte,
    FF 00 an escaped byte, a marker Pillow has a handler for is followed by its segment's length, one it
    has none for (restarts, SOI, EOI, JPG, JPGn) is not - and EOI does not stop it (round 49: one junk
    byte, or an EOI, ended the walk that Pillow went on with through 16 MiB). What does not parse is left
    to Pillow, which refuses it; the CPU budget (_decode) bounds anything this walk misses. Returns where
    the first scan starts (0 when the walk ended before one)."""
    position, stray, segments = 2, 0, 0  # Pillow reads FF D8 FF and goes on from that FF
    while position < len(data):
        if data[position] != 0xFF:
            junk = _JUNK_RUN.match(data, position)
            assert junk is not None
            stray, position = stray + junk.end() - position, junk.end()
        else:
            run = _FF_RUN.match(data, position)
            assert run is not None
            stray += run.end() - position - 1
            if run.end() >= len(data):
                return 0
            marker, position = data[run.end()], run.end() + 1
            if marker == 0xDA:  # Pillow's open stops at the first scan
                return run.end() - 1
            if marker == 0x00:
                stray += 1
            elif marker not in _JPEG_MARKERS:  # Pillow's "no marker found"
                return 0
            else:
                segments += 1
                if segments > MAX_JPEG_SEGMENTS:
                    raise ValueError(f"`image` is a JPEG of more than {MAX_JPEG_SEGMENTS} markers before its first scan: not read")
                if _JPEG_MARKERS[marker]:  # Pillow's handler reads the segment, its length first
                    length = int.from_bytes(data[position : position + 2], "big")
                    if length < 2:
                        return 0
                    position += length
        if stray > MAX_JPEG_FILL:
            raise ValueError(f"`image` is a JPEG with more than {MAX_JPEG_FILL} fill or stray bytes before its first scan: not read")
    return 0


def _refuse_extra_strips(data: bytes) -> None:
    """The first IFD's strip and tile counts against what its image has (a few entries read here, as the
    TIFF spec lays them out, in the byte order of its first two bytes - the prefixes Pillow accepts; what
    does not parse is left to Pillow, which refuses it). Both tables are counted: Pillow reads the strips
    when an IFD lists both (round 48: one tile and 8 Mi strips passed a check that counted the tiles)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (entries,) = struct.unpack_from(order + "H", data, ifd)
        tags: dict[int, tuple[int, int]] = {}  # tag -> (count, first value when inline)
        for index in range(entries):
            tag, kind, count = struct.unpack_from(order + "HHI", data, ifd + 2 + 12 * index)
            value = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, ifd + 10 + 12 * index)[0]
            if tag in tags and tag in _TIFF_LAYOUT_TAGS:
                # Pillow keeps the first entry it stores, and skips those of no data or of a type it does not
                # know: two entries for one tag let it read a table this check did not (round 49).
                raise ValueError(f"`image` is a TIFF listing tag {tag} twice in its first directory: not read")
            tags.setdefault(tag, (count, value))
    except struct.error:
        return
    width, height = tags.get(256, (1, 0))[1], tags.get(257, (1, 0))[1]
    planes = tags.get(277, (1, 1))[1] if tags.get(284, (1, 1))[1] == 2 else 1
    rows = max(1, min(tags.get(278, (1, height))[1] or height, height or 1))
    tile_width, tile_height = max(1, tags.get(322, (1, 1))[1]), max(1, tags.get(323, (1, 1))[1])
    tables = (
        (tags.get(273, (0, 0))[0], planes * -(-max(height, 1) // rows)),  # strips: listed, needed
        (tags.get(324, (0, 0))[0], planes * -(-width // tile_width) * -(-height // tile_height)),  # tiles
    )
    for listed, needed in tables:
        if listed > MAX_TIFF_STRIPS:  # Pillow makes a Python tile of each: 4 Mi of them took 24 s (round 47)
            raise ValueError(f"`image` is a TIFF of {listed} strips or tiles, more than the {MAX_TIFF_STRIPS} this step reads")
        if listed > max(needed, 1):
            raise ValueError(f"`image` is a TIFF listing {listed} strips or tiles where its {width}x{height} image has {needed}: not decoded")


@contextmanager
def _callers_file() -> Iterator[None]:
    """What Pillow or the library's loader raise about the file is the caller's mistake (INVALID_ARGUMENT),
    except running out of memory: that is the worker's state (what earlier requests left it holding, its
    memory limit), not the file's fault, and reaches the steps runner as a MemoryError (RESOURCE_EXHAUSTED)."""
    try:
        yield
    except MemoryError:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"`image` is not a {', '.join(FORMATS)} file") from None
    except Exception as exc:  # Pillow's DecompressionBombError (beyond 2x MAX_PIXELS, at the header), truncated files, broken headers
        if _opencv_out_of_memory(exc):
            raise MemoryError(f"decoding `image`: {exc}".strip()[:500]) from None
        raise ValueError(f"`image` is not an image file this step can decode: {type(exc).__name__}: {exc}"[:500]) from None


def _opencv_out_of_memory(exc: BaseException) -> bool:
    """OpenCV raises its own cv2.error, code StsNoMem ("Insufficient memory"), where Python would raise MemoryError."""
    return isinstance(exc, cv2.error) and getattr(exc, "code", None) == cv2.Error.StsNoMem


def _refuse_too_thin(h: int, w: int) -> None:
    """Before any of it is allocated: the sizes the reading would grow the image to (_fit_sides,
    _letterbox, then the detection's own scaling of the short side to DET_LIMIT_SIDE), from the sides
    alone, held to MAX_WORK_PIXELS."""
    size = f"{w}x{h}"
    if max(h, w) > MAX_SIDE:
        h, w = _scaled_sides(h, w, MAX_SIDE / max(h, w))
    if min(h, w) < MIN_SIDE:
        h, w = _scaled_sides(h, w, MIN_SIDE / min(h, w))
    h += 2 * _letterbox_pad(h, w)
    if min(h, w) < DET_LIMIT_SIDE:  # (rapidocr's DetPreProcess, limit_type "min")
        h, w = _scaled_sides(h, w, DET_LIMIT_SIDE / min(h, w))
    if h * w > MAX_WORK_PIXELS:
        raise ValueError(f"`image` of {size} pixels is too thin to read: the text detection would grow it to {w}x{h} pixels, more than the {MAX_WORK_PIXELS} this step allows (about 190:1 for a wide image, 15:1 for a tall one: crop it, or cut it into parts)")


def _scaled_sides(h: int, w: int, ratio: float) -> tuple[int, int]:
    new_h = int(round(int(h * ratio) / 32) * 32)
    new_w = int(round(int(w * ratio) / 32) * 32)
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"`image` of {w}x{h} pixels is too thin to read")
    return new_h, new_w


def _scaled(image: np.ndarray, ratio: float) -> tuple[np.ndarray, float, float]:
    h, w = image.shape[:2]
    new_h, new_w = _scaled_sides(h, w, ratio)
    return _library["cv2"].resize(image, (new_w, new_h)), h / new_h, w / new_w


def _fit_sides(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Long side at most MAX_SIDE, then short side at least MIN_SIDE (each rounded to multiples of 32)."""
    ratio_h = ratio_w = 1.0
    h, w = image.shape[:2]
    if max(h, w) > MAX_SIDE:
        image, ratio_h, ratio_w = _scaled(image, MAX_SIDE / max(h, w))
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        image, ratio_h, ratio_w = _scaled(image, MIN_SIDE / min(h, w))
    return image, ratio_h, ratio_w


def _letterbox_pad(h: int, w: int) -> int:
    """Rows of black added above and below a short or wide image (as many below)."""
    if h > MIN_HEIGHT and w / h <= WIDTH_HEIGHT_RATIO:
        return 0
    return int(abs(max(int(w / WIDTH_HEIGHT_RATIO), MIN_HEIGHT) * 2 - h) / 2)


def _letterbox(image: np.ndarray) -> tuple[np.ndarray, int]:
    pad = _letterbox_pad(*image.shape[:2])
    if not pad:
        return image, 0
    cv2 = _library["cv2"]
    return cv2.copyMakeBorder(image, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0)), pad


def _detect(image: np.ndarray, detect: Model) -> list[np.ndarray]:
    h, w = image.shape[:2]
    tensor = _library["det_pre"](image)
    if tensor is None:
        return []
    probabilities = next(iter(detect({"x": tensor}).values()))
    boxes, _ = _library["det_post"](probabilities, (h, w))
    kept = []
    for box in boxes:
        box = _clockwise(np.asarray(box, np.float32))
        box[:, 0] = np.array([int(min(max(x, 0), w - 1)) for x in box[:, 0]], np.float32)
        box[:, 1] = np.array([int(min(max(y, 0), h - 1)) for y in box[:, 1]], np.float32)
        if int(np.linalg.norm(box[0] - box[1])) > 3 and int(np.linalg.norm(box[0] - box[3])) > 3:
            kept.append(box)
    return kept


def _clockwise(points: np.ndarray) -> np.ndarray:
    """Top-left, top-right, bottom-right, bottom-left: the two left-most points by y, then the right ones."""
    by_x = points[np.argsort(points[:, 0]), :]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1]), :]
    top_right, bottom_right = right[np.argsort(right[:, 1]), :]
    return np.array([top_left, top_right, bottom_right, bottom_left], np.float32)


def _reading_order(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Top to bottom, then left to right among boxes whose tops are within 10 pixels (one bubble pass)."""
    ordered = sorted(boxes, key=lambda box: (box[0][1], box[0][0]))
    for i in range(len(ordered) - 1):
        for j in range(i, -1, -1):
            if abs(ordered[j + 1][0][1] - ordered[j][0][1]) < 10 and ordered[j + 1][0][0] < ordered[j][0][0]:
                ordered[j], ordered[j + 1] = ordered[j + 1], ordered[j]
            else:
                break
    return ordered


def _crop(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    cv2 = _library["cv2"]
    width = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    height = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    warp = cv2.getPerspectiveTransform(points.astype(np.float32), target)
    crop = cv2.warpPerspective(image, warp, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    if crop.shape[0] / crop.shape[1] >= 1.5:  # a tall crop is a vertical line: read it turned
        crop = np.rot90(crop)
    return crop


def _normalised(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resized to `height` (width by aspect ratio, at most `width`), scaled to [-1, 1], zero-padded right."""
    resized_w = min(width, int(math.ceil(height * crop.shape[1] / float(crop.shape[0]))))
    resized = _library["cv2"].resize(crop, (resized_w, height)).astype(np.float32).transpose((2, 0, 1)) / 255
    padded = np.zeros((3, height, width), np.float32)
    padded[:, :, :resized_w] = (resized - 0.5) / 0.5
    return padded


def _by_aspect(crops: list[np.ndarray]) -> np.ndarray:
    return np.argsort(np.array([crop.shape[1] / float(crop.shape[0]) for crop in crops]))


def _classify(crops: list[np.ndarray], classify: Model) -> list[np.ndarray]:
    """Lines the classifier finds upside down (label 1, '180', score over 0.9) are turned 180 degrees."""
    crops = list(crops)
    order = _by_aspect(crops)
    _, height, width = CLS_SHAPE
    for start in range(0, len(crops), CLS_BATCH):
        members = order[start : start + CLS_BATCH]
        batch = np.stack([_normalised(crops[i], height, width) for i in members])
        probabilities = next(iter(classify({"x": batch}).values()))
        for index, row in zip(members, probabilities):
            label = int(row.argmax())
            if label == 1 and row[label] > CLS_THRESHOLD:
                crops[index] = _library["cv2"].rotate(crops[index], 1)
    return crops


def _recognise(crops: list[np.ndarray], recognise: Model) -> list[tuple[str, float]]:
    results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
    order = _by_aspect(crops)
    _, height, width = REC_SHAPE
    for start in range(0, len(crops), REC_BATCH):
        members = order[start : start + REC_BATCH]
        widest = max(width / height, *(crops[i].shape[1] / crops[i].shape[0] for i in members))
        batch = np.stack([_normalised(crops[i], height, int(height * widest)) for i in members])
        probabilities = next(iter(recognise({"x": batch}).values()))
        for index, (text, score) in zip(members, _library["decode"](probabilities)):
            results[index] = (text, score)
    return results


def _original_points(boxes: np.ndarray, top: int, ratio_h: float, ratio_w: float, raw_h: int, raw_w: int) -> np.ndarray:
    boxes[:, :, 1] -= top
    boxes[:, :, 0] *= ratio_w
    boxes[:, :, 1] *= ratio_h
    boxes = np.where(boxes < 0, 0, boxes)
    boxes[..., 0] = np.minimum(boxes[..., 0], raw_w)
    boxes[..., 1] = np.minimum(boxes[..., 1], raw_h)
    return boxes
