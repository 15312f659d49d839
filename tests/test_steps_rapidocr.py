"""The OCR chain (examples/models/ocr: ocr_det -> ocr_cls -> ocr_rec with the built-in openinfer:rapidocr
steps) against `rapidocr_onnxruntime` 1.4.4 itself, in process, with its defaults: the same text lines, scores
and boxes, on images nobody here made (the PNG and JPEG files shipped inside the installed packages:
scikit-image's data - a scanned page of text among them -, matplotlib's sample data, networkx's and sympy's
test baselines) and on lines rendered here to reach each
branch of the pipeline (upside down, vertical, very wide, tiny, huge, grey, RGBA, JPEG)."""
from __future__ import annotations

import io
import struct
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

from daemon_harness import RunningDaemon, cleanup_workdir, start_daemon
from ocr_images import rendered_lines, shipped_images
from openinfer.client import Client, OpenInferError
from openinfer.daemon.steps.builtin.rapidocr import MAX_JPEG_SCANS
from repo_builder import ModelRepo

pytestmark = pytest.mark.live

OCR_MODELS = ["ocr_det", "ocr_cls", "ocr_rec", "ocr"]
RENDERED = rendered_lines()


@pytest.fixture(scope="module")
def ocr_daemon() -> Iterator[RunningDaemon]:
    repo = ModelRepo("oi-ocr-")
    repo.examples(OCR_MODELS)
    running = start_daemon(repo.ready())
    yield running
    running.stop()
    cleanup_workdir(running)
    repo.remove()


@pytest.fixture(scope="module")
def library() -> Any:
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR()


def assert_same_lines(result: Any, expected: Any, what: str) -> None:
    expected = expected or []
    texts = [t.decode("utf-8") for t in result.outputs["text"]]
    assert texts == [line[1] for line in expected], what
    np.testing.assert_allclose(result.outputs["score"], np.array([line[2] for line in expected], np.float32), rtol=1e-4, atol=1e-4, err_msg=what)
    np.testing.assert_allclose(result.outputs["box"], np.array([line[0] for line in expected], np.float32).reshape(-1, 4, 2), atol=1e-2, err_msg=what)


def fli_polyglot(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with a comment (COM) first, of 0x11AF bytes: its length makes bytes 4-5 FLI's magic (11 AF), and
    its body is an FLI header declaring width x height with one frame, FLI_BLACK (attacker round 8). Opened
    with the step's FORMATS it is `jpeg`; opened with every Pillow plugin (FLI comes before JPEG in
    `Image.ID`), a width x height FLI."""
    body = bytearray(0x11AF - 2)  # the comment's payload: file offsets 6 onwards

    def put(offset: int, data: bytes) -> None:
        body[offset - 6 : offset - 6 + len(data)] = data

    put(6, struct.pack("<HHHHH", 1, width, height, 8, 0))  # frames, width, height, depth, flags
    put(128, struct.pack("<IHH8x", 26, 0xF1FA, 1))  # the first frame: 26 bytes, one chunk
    put(144, struct.pack("<IH4x", 10, 13))  # FLI_BLACK: the whole frame black
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", 0x11AF) + bytes(body) + jpeg[2:]


def test_the_ocr_chain_reads_what_rapidocr_reads_on_images_shipped_in_packages(ocr_daemon: RunningDaemon, library: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = shipped_images()
    assert len(images) >= 8, images

    def through_the_daemon() -> list[Any]:  # meanwhile the library reads the same images here
        with Client(ocr_daemon.address, timeout=60) as client:
            return [client.infer("ocr", {"image": path.read_bytes()}) for path in images]

    with ThreadPoolExecutor(1) as pool:
        daemon_side = pool.submit(through_the_daemon)
        expected = [library(path.read_bytes())[0] for path in images]
        results = daemon_side.result()
    for path, result, lines in zip(images, results, expected):
        assert_same_lines(result, lines, str(path))
        assert result.stages is not None and result.stages["ocr_det"]["runs"] == 1
    assert sum(bool(lines) for lines in expected) >= 4, "too few of the shipped images hold text to compare on"
    # scikit-image's scanned page: real printed text, five lines of it.
    page = [lines for path, lines in zip(images, expected) if path.name == "page.png" and path.parent.name == "data"]
    assert page and len(page[0]) >= 5, page


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_the_ocr_chain_reads_what_rapidocr_reads_on_each_branch(ocr_daemon: RunningDaemon, library: Any, name: str) -> None:
    data = RENDERED[name]
    expected, _ = library(data)
    with Client(ocr_daemon.address, timeout=60, direct=name != "jpeg") as client:  # the front door too
        result = client.infer("ocr", {"image": data})
    assert_same_lines(result, expected, name)
    if name in ("line", "upside_down", "grey", "rgba"):
        assert expected, f"rapidocr read nothing in {name}: the case does not test the branch"
    if expected:
        assert result.stages is not None and result.stages["ocr_rec"]["runs"] >= 1 and result.stages["ocr_cls"]["runs"] >= 1


def scan_bomb(scans: int, side: int = 256) -> bytes:
    """A progressive JPEG of one of its own AC scans repeated until it has `scans` + 1 scans: each is decoded
    over the whole image (round 44: 8000 of them in 1 MB at 8192x8192 held the chain's worker 20 s, then got
    it killed). Pillow's own file, segments copied as they are; only the last scan is repeated."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (side, side), 255).save(out, "JPEG", quality=50, progressive=True)
    data = out.getvalue()
    last = data.rindex(b"\xff\xda")
    tail = data[last:-2]  # the last scan: its header and its entropy-coded data, up to the EOI marker
    return data[:-2] + tail * (scans + 1 - data.count(b"\xff\xda")) + b"\xff\xd9"


def with_mpf(jpeg: bytes) -> bytes:
    """The JPEG with an APP2 MPF segment saying it holds two images: Pillow then opens it as an MPO (round
    45: the scan limit looked at format "JPEG" only, and frame 0 of the MPO was decoded scan by scan)."""
    entries = 3
    index_at = 8 + 2 + entries * 12 + 4
    ifd = struct.pack(">H", entries)
    ifd += struct.pack(">HHI", 0xB000, 7, 4) + b"0100"
    ifd += struct.pack(">HHI", 0xB001, 4, 1) + struct.pack(">I", 2)
    ifd += struct.pack(">HHI", 0xB002, 7, 32) + struct.pack(">I", index_at) + struct.pack(">I", 0)
    index = struct.pack(">IIIHH", 0x20030000, 0, 0, 0, 0) + struct.pack(">IIIHH", 0, 0, 0, 0, 0)
    body = b"MPF\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd + index
    return jpeg[:2] + b"\xff\xe2" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def test_a_progressive_jpeg_within_the_scan_limit_is_read() -> None:
    """The limit leaves real files alone: Pillow's progressive JPEG, and one at the limit, decode."""
    from PIL import Image

    from openinfer.daemon.steps.builtin import rapidocr

    at_the_limit = scan_bomb(MAX_JPEG_SCANS - 1)
    with Image.open(io.BytesIO(at_the_limit)) as image:
        image.load()  # a JPEG Pillow decodes: the builder makes real files
    with Image.open(io.BytesIO(at_the_limit)) as image:
        rapidocr._refuse_costly_decode(image, at_the_limit, rapidocr._refuse_costly_layout(at_the_limit))
    for bomb in (scan_bomb(MAX_JPEG_SCANS), with_mpf(scan_bomb(MAX_JPEG_SCANS))):
        with Image.open(io.BytesIO(bomb), formats=rapidocr.FORMATS) as image, pytest.raises(ValueError, match="more than the"):
            rapidocr._refuse_costly_decode(image, bomb, rapidocr._refuse_costly_layout(bomb))
    # TIFF: the compressions decoded once per pixel are read; JPEG-in-TIFF is not (rounds 45-46: libtiff
    # decodes its strips by tables it parses itself, and files the count passed held the worker 14-20 s).
    # Nor one whose tag data the file does not hold: Pillow skips such a tag, libtiff reads it (round 46:
    # Pillow saw a later, harmless copy of the strip tables; libtiff decoded the first one).
    lying = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(lying, "TIFF", compression="tiff_lzw", tiffinfo={270: "x" * 64})
    raw = bytearray(lying.getvalue())
    ifd = struct.unpack_from("<I", raw, 4)[0]
    for entry in range(struct.unpack_from("<H", raw, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", raw, at)[0] == 270:  # ImageDescription: say it holds more than the file
            struct.pack_into("<I", raw, at + 4, 2 * len(raw))
    with pytest.raises(ValueError, match="Tag data larger than file"):
        rapidocr._decode(bytes(raw))
    for compression, read in (("tiff_lzw", True), ("tiff_adobe_deflate", True), ("packbits", True), ("jpeg", False)):
        tiff = io.BytesIO()
        Image.new("RGB", (64, 64), "white").save(tiff, "TIFF", compression=compression)
        with Image.open(io.BytesIO(tiff.getvalue()), formats=rapidocr.FORMATS) as image:
            if read:
                rapidocr._refuse_costly_decode(image, tiff.getvalue(), 0)
            else:
                with pytest.raises(ValueError, match="send the JPEG itself"):
                    rapidocr._refuse_costly_decode(image, tiff.getvalue(), 0)


def test_what_is_not_an_image_is_the_callers_mistake_and_the_worker_serves_on(ocr_daemon: RunningDaemon) -> None:
    from PIL import Image

    bomb, between = io.BytesIO(), io.BytesIO()
    Image.new("1", (16000, 16000)).save(bomb, format="PNG")  # a few KiB that would decode to 256 Mpx
    # Between MAX_PIXELS and twice it Pillow only warns: this one was decoded, holding the worker for seconds
    # (an attacker's 11000x11000 F, RGBA, I;16 or LA files 4-10 s each). Refused from its header now, the
    # error naming its size (which only the header told) and the limit.
    Image.new("1", (9000, 9000)).save(between, format="PNG")
    truncated = RENDERED["jpeg"][: len(RENDERED["jpeg"]) // 2]
    # Checked as the JPEG it is to FORMATS, but the library's loader opened the bytes again with every plugin:
    # a 9000x9000 FLI (81 Mpx, over MAX_PIXELS) was decoded and answered OK. Decoded as what was checked now:
    # a truncated JPEG.
    polyglot = fli_polyglot(truncated, 9000, 9000)
    eps, pcx = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(eps, format="EPS")  # Pillow would run Ghostscript: a new process
    Image.new("RGB", (64, 32), "white").save(pcx, format="PCX")  # decoded in process, but no one's input here
    cases = {
        scan_bomb(MAX_JPEG_SCANS): f"is a JPEG of {MAX_JPEG_SCANS + 1} scans, more than the {MAX_JPEG_SCANS} this step decodes",
        with_mpf(scan_bomb(MAX_JPEG_SCANS)): f"is a JPEG of {MAX_JPEG_SCANS + 1} scans",
        b"": "must be the bytes of an image file",
        b"%PDF-1.7 not an image": "is not a PNG, JPEG, BMP, TIFF, WEBP, GIF file",
        eps.getvalue(): "is not a PNG, JPEG, BMP, TIFF, WEBP, GIF file",
        pcx.getvalue(): "is not a PNG, JPEG, BMP, TIFF, WEBP, GIF file",
        bomb.getvalue(): "DecompressionBomb",
        between.getvalue(): "is 9000x9000 = 81000000 pixels, more than the 67108864 this step decodes: refused, not decoded",
        truncated: "is not an image file",
        polyglot: "is not an image file this step can decode: OSError: image file is truncated",
    }
    with Client(ocr_daemon.address, timeout=60) as client:
        pid = next(w["pid"] for w in client.status()["workers"] if w["model"] == "ocr")
        for data, words in cases.items():
            with pytest.raises(OpenInferError) as caught:
                client.infer("ocr", {"image": data})
            assert caught.value.code == "INVALID_ARGUMENT" and words in str(caught.value), (data[:20], str(caught.value))
        assert [t.decode() for t in client.infer("ocr", {"image": RENDERED["line"]}).outputs["text"]]
        # Whole, the polyglot is read as its JPEG (its text), not as the FLI's 9000x9000 black.
        as_jpeg = client.infer("ocr", {"image": RENDERED["jpeg"]}).outputs["text"]
        assert as_jpeg and list(client.infer("ocr", {"image": fli_polyglot(RENDERED["jpeg"], 9000, 9000)}).outputs["text"]) == list(as_jpeg)
        assert next(w["pid"] for w in client.status()["workers"] if w["model"] == "ocr") == pid  # nothing was restarted


def test_layouts_pillow_reads_a_byte_or_an_entry_at_a_time_are_refused_before_it_opens_them() -> None:
    """Round 47: a 64x64 JPEG after 60 MiB of fill bytes, and a 64x64 raw TIFF of 4 Mi one-row strips all
    pointing at the same 64 bytes, held the ocr chain's worker past max_compute_ms (killed, twice each):
    Pillow reads fill bytes one at a time and makes a Python tile of each strip offset, wrapping past the
    image. A 33 KB RLE8 BMP of end-of-line codes took 10 s in Pillow's Python RLE decoder. Each is refused
    before Pillow reads it; honest files of each kind are read."""
    from PIL import Image

    from openinfer.daemon.steps.builtin import rapidocr

    rapidocr.setup({"ppocr_keys.txt": b"a\nb"})  # the library's loader, as a worker has it
    honest_jpeg, honest_tiff, honest_bmp = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(honest_jpeg, "JPEG")
    Image.new("L", (64, 64), 255).save(honest_tiff, "TIFF", tiffinfo={278: 1})  # 64 one-row strips
    Image.new("L", (64, 64), 255).save(honest_bmp, "BMP")
    for honest in (honest_jpeg, honest_tiff, honest_bmp):
        assert rapidocr._decode(honest.getvalue()).shape == (64, 64, 3)
    jpeg = honest_jpeg.getvalue()
    with pytest.raises(ValueError, match="more than 65536 fill or stray bytes before its first scan"):
        rapidocr._decode(jpeg[:2] + b"\xff" * 140000 + jpeg[2:])
    # Round 48: empty APP0 segments (16 MiB of them: 6 s in Pillow's open) and FF 00 pairs, a turn of its loop each.
    with pytest.raises(ValueError, match="more than 1024 markers before its first scan"):
        rapidocr._decode(jpeg[:2] + b"\xff\xe0\x00\x02" * 2000 + jpeg[2:])
    with pytest.raises(ValueError, match="more than 65536 fill or stray bytes"):
        rapidocr._decode(jpeg[:2] + b"\xff\x00" * 70000 + jpeg[2:])
    # The honest TIFF's StripOffsets entry made to list 4 Mi strips (the count field only: the check reads it first).
    tiff = bytearray(honest_tiff.getvalue())
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    for entry in range(struct.unpack_from("<H", tiff, ifd)[0]):
        if struct.unpack_from("<H", tiff, ifd + 2 + 12 * entry)[0] == 273:
            struct.pack_into("<I", tiff, ifd + 2 + 12 * entry + 4, 4 << 20)
    with pytest.raises(ValueError, match="TIFF of 4194304 strips or tiles, more than the 65536"):
        rapidocr._decode(bytes(tiff))
    # Round 48: the same behind the prefixes Pillow also accepts (its "invalid" ones, BigTIFF), and beside
    # a tile table, which the check counted instead of the strips Pillow reads.
    with pytest.raises(ValueError, match="TIFF of 4194304 strips or tiles"):
        rapidocr._decode(b"II\x00*" + bytes(tiff[4:]))
    with pytest.raises(ValueError, match="is a BigTIFF"):
        rapidocr._decode(b"II+\x00" + bytes(tiff[4:]))
    both = bytearray(tiff)
    for entry in range(struct.unpack_from("<H", both, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", both, at)[0] == 279:  # StripByteCounts renamed TileOffsets: one tile listed
            struct.pack_into("<HHII", both, at, 324, 4, 1, 8)
    with pytest.raises(ValueError, match="TIFF of 4194304 strips or tiles"):
        rapidocr._refuse_costly_layout(bytes(both))
    bmp = bytearray(honest_bmp.getvalue())
    struct.pack_into("<I", bmp, 30, 1)  # BI_RLE8
    with pytest.raises(ValueError, match="run-length encoded BMP"):
        rapidocr._decode(bytes(bmp))


def png_chunk_flood(total: int) -> bytes:
    """A white 64x64 PNG with empty private chunks after its header, up to `total` bytes: Pillow's open
    reads each (and checks its CRC) in a turn of a Python loop - 16 MiB of them took 2.9 s of CPU here, no
    layout check refuses them (rounds 44-48 called them the residual) and no honest writer makes them."""
    import zlib

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(out, "PNG")
    png = out.getvalue()
    header_end = 8 + 25  # the signature and IHDR
    chunk = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    return png[:header_end] + chunk * ((total - len(png)) // len(chunk)) + png[header_end:]


def test_junk_or_an_eoi_before_a_jpegs_markers_and_a_tiff_tag_listed_twice_are_refused_and_honest_files_read() -> None:
    """Round 49: one non-FF byte after a JPEG's first segment (Pillow skips junk a byte at a time) or an EOI
    there (Pillow's open walks on past it) ended the header walk, and the 16 MiB of fill bytes or empty
    APP0s behind it held the chain's worker 5-8.5 s; a TIFF listing StripOffsets twice, first with no data
    or of a type Pillow does not know (it skips that entry and reads the second), passed the strip count
    with 8 Mi strips and got the worker killed at max_compute_ms. A progressive JPEG whose ICC profile holds
    FF DA bytes by chance was refused for scans it does not have."""
    from PIL import Image

    from openinfer.daemon.steps.builtin import rapidocr

    rapidocr.setup({"ppocr_keys.txt": b"a\nb"})
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(out, "JPEG")
    jpeg = out.getvalue()
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    head, rest = jpeg[:app0_end], jpeg[app0_end:]
    with pytest.raises(ValueError, match="more than 65536 fill or stray bytes"):
        rapidocr._decode(head + b"\x00" + b"\xff" * 70000 + rest)
    with pytest.raises(ValueError, match="more than 65536 fill or stray bytes"):
        rapidocr._decode(head + b"\x00" * 70000 + rest)
    with pytest.raises(ValueError, match="more than 1024 markers"):
        rapidocr._decode(head + b"\xff\xd9" + b"\xff\xe0\x00\x02" * 2000 + rest)
    assert rapidocr._decode(head + b"\x00" * 100 + rest).shape == (64, 64, 3)  # a little junk is read, as Pillow reads it

    tiff_out = io.BytesIO()
    Image.new("L", (64, 64), 255).save(tiff_out, "TIFF", tiffinfo={278: 1})
    tiff = tiff_out.getvalue()
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    entries = struct.unpack_from("<H", tiff, ifd)[0]
    for first in (struct.pack("<HHII", 273, 4, 0, 0), struct.pack("<HHII", 273, 99, 1, 0)):  # no data; a type Pillow skips
        doubled = tiff[:ifd] + struct.pack("<H", entries + 1) + first + tiff[ifd + 2 :]
        with pytest.raises(ValueError, match="listing tag 273 twice in its first directory"):
            rapidocr._decode(doubled)

    icc = (b"\xff\xda" + bytes(254)) * 4096  # 1 MiB of profile, 4096 FF DA pairs in it
    progressive = io.BytesIO()
    Image.new("RGB", (256, 64), "white").save(progressive, "JPEG", progressive=True, icc_profile=icc)
    assert progressive.getvalue().count(b"\xff\xda") > rapidocr.MAX_JPEG_SCANS
    assert rapidocr._decode(progressive.getvalue()).shape == (64, 256, 3)


def test_what_takes_more_cpu_to_open_than_a_header_is_worth_is_refused_by_the_budget(ocr_daemon: RunningDaemon) -> None:
    """The layouts nobody has listed yet are bounded by what they cost (rapidocr.py OPEN_CPU_S, through the
    worker's SIGPROF - setitimer is in its seccomp policy): 16 MiB of empty PNG chunks, which no check refuses
    and which held the chain's worker ~3 s of CPU (4-16 s in earlier rounds' measures), is refused after
    0.5 s of it; the same worker then reads a page."""
    flood = png_chunk_flood(16 * 1024 * 1024 - 4096)
    with Client(ocr_daemon.address, timeout=60) as client:
        pid = next(w["pid"] for w in client.status()["workers"] if w["model"] == "ocr")
        with pytest.raises(OpenInferError) as caught:
            client.infer("ocr", {"image": flood})
        assert caught.value.code == "INVALID_ARGUMENT" and "took more than 0.5 s of CPU to open" in str(caught.value), str(caught.value)
        assert [t.decode() for t in client.infer("ocr", {"image": RENDERED["line"]}).outputs["text"]]
        assert next(w["pid"] for w in client.status()["workers"] if w["model"] == "ocr") == pid  # nothing was restarted


@pytest.mark.parametrize("size", [(1999, 1), (2000, 1), (1, 1999), (40, 1999)], ids=["1999x1", "2000x1", "1x1999", "40x1999"])
def test_an_image_too_thin_to_read_is_refused_before_the_reading_grows_it(ocr_daemon: RunningDaemon, size: tuple[int, int]) -> None:
    """Round 24's attacker: an 81-byte 1999x1 PNG grew, as rapidocr reads it, to a 15000x60000 image
    (2.7 GB; a 1x1999 one to a 1379264x736 tensor, 11 GiB) and failed INTERNAL or RESOURCE_EXHAUSTED
    after seconds of the chain's worker, left holding most of its memory. Refused from its sides now,
    the caller's mistake, and the worker is unchanged."""
    from PIL import Image

    thin = io.BytesIO()
    Image.new("L", size, 255).save(thin, format="PNG")
    def rss_of_chain_workers(client: Client) -> dict[int, int]:  # (from /proc: `status` shows figures up to a second old)
        return {w["pid"]: psutil.Process(w["pid"]).memory_info().rss for w in client.status()["workers"] if w["model"] == "ocr"}

    with Client(ocr_daemon.address, timeout=60) as client:
        before = rss_of_chain_workers(client)
        with pytest.raises(OpenInferError) as caught:
            client.infer("ocr", {"image": thin.getvalue()})
        assert caught.value.code == "INVALID_ARGUMENT" and f"`image` of {size[0]}x{size[1]} pixels is too thin to read" in str(caught.value), str(caught.value)
        after = rss_of_chain_workers(client)
    assert set(after) == set(before), "the chain's worker was replaced"
    assert all(after[pid] < before[pid] + (256 << 20) for pid in before), (before, after)


@pytest.mark.parametrize("raised", ["MemoryError", "OpenCV out of memory"])
def test_running_out_of_memory_while_decoding_is_not_the_callers_mistake(monkeypatch: pytest.MonkeyPatch, raised: str) -> None:
    """In process: the loader out of memory (a worker left holding 2.2 GiB of its 4 GiB by two dense pages,
    attacker round 8) was reported INVALID_ARGUMENT ("... MemoryError") for a plain 6000x6000 PNG: it is the
    worker's state, RESOURCE_EXHAUSTED, and the MemoryError reaches the steps runner as itself."""
    import cv2

    from openinfer.daemon.steps.builtin import rapidocr
    from openinfer.daemon.steps.contract import RESOURCE_EXHAUSTED, step_failed

    def out_of_memory(image: Any) -> np.ndarray:
        if raised == "MemoryError":
            raise MemoryError()
        error = cv2.error("OpenCV(5.1.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 108000000 bytes in function 'OutOfMemoryError'")
        error.code = cv2.Error.StsNoMem
        raise error

    monkeypatch.setitem(rapidocr._library, "load", out_of_memory)
    with pytest.raises(MemoryError) as caught:
        rapidocr._decode(RENDERED["line"])
    assert step_failed("drive", "openinfer:rapidocr", caught.value).code == RESOURCE_EXHAUSTED
