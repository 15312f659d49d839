"""What the supervisor accepts from a prepare helper (daemon/files/prepared.py): exactly a prepared directory for
the source it hashed itself, or nothing - checked on crafted directories, as a hostile helper would leave
them (tests/attack/test_prepare_helper.py does it with a real helper and daemon)."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from openinfer.daemon.files.cache_key import MAX_VERSION_ENTRIES, version_files
from openinfer.daemon.loop.offloop import OffLoopRunner
from openinfer.daemon.files.prepared import Expectation, PreparedRejected, PreparedStore
from openinfer.daemon.files.prepared_layout import CHECK, MANIFEST, OPT_MODEL, WEIGHTS

EXPECTED = Expectation(source_sha256="ab" * 32, onnxruntime="1.0", cpu="c0ffee", max_file_bytes=1 << 20)
KEY = "abababab-ort1.0-c0ffee"


def write_prepared(directory: Path, **manifest_changes: object) -> None:
    (directory / OPT_MODEL).write_bytes(b"model")
    (directory / WEIGHTS).write_bytes(b"w" * 100)
    (directory / CHECK).write_bytes(b"check")
    manifest = {"source": "m/1/model.onnx", "source_sha256": EXPECTED.source_sha256, "onnxruntime": "1.0", "cpu": "c0ffee",
                "weights_bytes": 100, "weights_sha256": "0" * 64, "model_sha256": "0" * 64, **manifest_changes}
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def store(tmp_path: Path) -> PreparedStore:
    return PreparedStore(tmp_path / "cache", worker_uid=None)


@pytest.mark.unit
def test_a_well_formed_directory_is_renamed_under_the_supervisors_key(store: PreparedStore) -> None:
    tmp = store.new_tmp_dir()
    write_prepared(tmp)
    final = store.finalize(tmp, KEY, EXPECTED)
    assert final == store.base / KEY and not tmp.exists()
    assert sorted(os.listdir(final)) == sorted([OPT_MODEL, WEIGHTS, CHECK, MANIFEST])
    assert all((final / name).stat().st_mode & 0o777 == 0o644 for name in os.listdir(final))
    assert store.holds(KEY, EXPECTED) == f"{WEIGHTS} does not match its manifest"  # the hashes are checked on reuse


def symlink_to(target: Path) -> Callable[[Path], None]:
    return lambda d: (d / "notes.txt").symlink_to(target)


CRAFTED: dict[str, tuple[Callable[[Path], None], str]] = {
    "extra file": (lambda d: (d / "lib.so").write_bytes(b""), "unexpected entry 'lib.so'"),
    "missing file": (lambda d: (d / CHECK).unlink(), f"missing '{CHECK}'"),
    "weights as a symlink": (lambda d: ((d / WEIGHTS).unlink(), (d / WEIGHTS).symlink_to("/etc/passwd")), f"'{WEIGHTS}': Too many levels"),
    "a directory": (lambda d: ((d / CHECK).unlink(), (d / CHECK).mkdir()), f"'{CHECK}' is not a regular file"),
    "a hard link": (lambda d: os.link(d / WEIGHTS, d.parent / "elsewhere"), f"'{WEIGHTS}' has 2 links"),
    "oversized": (lambda d: (d / OPT_MODEL).write_bytes(b"x" * (EXPECTED.max_file_bytes + 1)), "over the limit"),
    "another source": (lambda d: write_prepared(d, source_sha256="cd" * 32), "source_sha256 is"),
    "another onnxruntime": (lambda d: write_prepared(d, onnxruntime="0.9"), "onnxruntime is '0.9'"),
    "manifest not JSON": (lambda d: (d / MANIFEST).write_text("{"), "not JSON"),
    "manifest lies about the size": (lambda d: write_prepared(d, weights_bytes=1), "weights_bytes does not match"),
}


@pytest.mark.parametrize("case", CRAFTED)
@pytest.mark.unit
def test_anything_else_is_refused_and_removed(store: PreparedStore, case: str) -> None:
    tmp = store.new_tmp_dir()
    write_prepared(tmp)
    craft, why = CRAFTED[case]
    craft(tmp)
    with pytest.raises(PreparedRejected, match=why):
        store.finalize(tmp, KEY, EXPECTED)
    assert not tmp.exists() and not (store.base / KEY).exists()


@pytest.mark.unit
def test_a_symlinks_target_is_never_touched(store: PreparedStore, tmp_path: Path) -> None:
    target = tmp_path / "someone-elses"
    target.write_bytes(b"x")
    target.chmod(0o600)
    tmp = store.new_tmp_dir()
    write_prepared(tmp)
    symlink_to(target)(tmp)
    with pytest.raises(PreparedRejected, match="unexpected entry 'notes.txt'"):
        store.finalize(tmp, KEY, EXPECTED)
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.unit
def test_only_its_own_temporary_directories_are_finalized(store: PreparedStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store.finalize(store.base / ".." / "x", KEY, EXPECTED)
    with pytest.raises(ValueError):
        store.finalize(tmp_path / ".tmp-x", KEY, EXPECTED)


@pytest.mark.unit
def test_offloop_results_and_errors_come_back_on_collect() -> None:
    runner = OffLoopRunner()
    got: list[object] = []
    try:
        runner.submit(lambda: 6 * 7, got.append)
        runner.submit(lambda: 1 / 0, got.append)
        while len(got) < 2:
            assert select.select([runner.fd], [], [], 10)[0], "no wake-up from the background thread"
            runner.collect()
    finally:
        runner.close()
    assert got[0] == 42 and isinstance(got[1], ZeroDivisionError)


@pytest.mark.live
def test_the_supervisors_side_imports_neither_onnxruntime_nor_onnx() -> None:
    """It computes keys and checks prepared directories without them (a fresh interpreter: this one has
    imported onnxruntime for other tests)."""
    code = (
        "import sys\n"
        "import openinfer.daemon.supervisor, openinfer.daemon.workerpool.preparation, openinfer.daemon.files.cache_key, openinfer.daemon.commands.deployment_checks\n"
        "from openinfer.daemon.files.cache_key import cache_key\n"
        "cache_key('0' * 64, '1' * 64, 'repo')\n"
        "print(sorted(m for m in ('onnxruntime', 'onnx') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def _files(version: Path, **kwargs: object) -> Any:
    fd = os.open(version, os.O_PATH | os.O_DIRECTORY)
    try:
        return version_files(fd, "model.onnx", kwargs.pop("max_bytes", None), **kwargs)  # type: ignore[arg-type]
    finally:
        os.close(fd)


@pytest.mark.attack
def test_the_key_of_a_version_directory_changes_with_any_file_beside_the_model_and_opens_nothing_else(tmp_path: Path) -> None:
    """Attacker round 28: a replaced external-data file kept its model's key. Every entry beside the model
    counts: a file's bytes, a new file, one in a subdirectory; a FIFO or a symlink counts by its name, never
    opened (a FIFO would hold the walk); the model file itself is hashed apart."""
    version = tmp_path / "m" / "1"
    (version / "data").mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"model")
    (version / "weights.bin").write_bytes(b"\0" * 64)
    base = _files(version)
    (version / "model.onnx").write_bytes(b"other model")
    assert _files(version).sha256 == base.sha256
    (version / "weights.bin").write_bytes(b"\0" * 63 + b"\1")
    changed = _files(version)
    assert changed.sha256 != base.sha256
    (version / "data" / "more.bin").write_bytes(b"x")
    deeper = _files(version)
    assert deeper.sha256 not in (base.sha256, changed.sha256)
    os.mkfifo(version / "pipe")
    os.symlink("/etc/shadow", version / "link")
    with_others = _files(version)  # returns: the FIFO was not opened
    assert with_others.sha256 != deeper.sha256
    assert [stamp[0] for stamp in with_others.stamps] == ["data", "data/more.bin", "link", "pipe", "weights.bin"]


@pytest.mark.unit
def test_a_write_after_the_hash_shows_in_the_stamps_and_too_much_is_refused(tmp_path: Path) -> None:
    """What the supervisor checks after a helper ran (preparation.files_changed): the stamps of a walk that
    hashes nothing. And the walk is bounded: by the bytes beside the model, and by its entries."""
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "weights.bin").write_bytes(b"\0" * 64)
    before = _files(version)
    assert _files(version, hash_bytes=False).stamps == before.stamps
    with open(version / "weights.bin", "r+b") as data:
        data.write(b"\1")
    assert _files(version, hash_bytes=False).stamps != before.stamps
    with pytest.raises(OSError, match="more than 63 bytes"):
        _files(version, max_bytes=63)
    for i in range(MAX_VERSION_ENTRIES):
        (version / f"f{i}").touch()
    with pytest.raises(OSError, match=f"more than {MAX_VERSION_ENTRIES} entries"):
        _files(version)


@pytest.mark.attack
def test_files_beside_the_model_that_grew_after_they_were_sized_are_not_hashed(tmp_path: Path) -> None:
    """Round 30's attacker: the hashing order counted the files beside a model as stat'ed first, and the
    hash then read whatever they had grown to (a sparse 3.9 GiB pad made after the stat: 16 s of hashing,
    ahead of an honest model). The hash reads no more than they came to when sized: here 0 bytes, then a
    1 TiB pad - refused before a byte of it is read."""
    from openinfer.daemon.workerpool.preparation import Source, plan_preparation

    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"model")
    (version / "pad").touch()
    with open(version / "pad", "r+b") as pad:
        pad.truncate(1 << 40)
    version_fd = os.open(version, os.O_PATH | os.O_DIRECTORY)
    model_fd = os.open(version / "model.onnx", os.O_RDONLY)
    store = PreparedStore(tmp_path / "cache", None)
    try:
        with pytest.raises(OSError, match="the files beside the model changed after they were sized: the files beside the model come to more than 0 bytes"):
            plan_preparation(Source(version_fd, model_fd, 5, "model.onnx"), store, 0, "repo\0m\01")
    finally:
        store.close()


@pytest.mark.attack
def test_only_entries_of_the_cache_are_set_aside_or_swept(tmp_path: Path) -> None:
    """Round 34: retire_unused set aside every name but those kept, and a start swept every .stale-/.tmp-
    name: a cache_dir that held anything else - the model repository, a state directory, the runtime
    directory - lost it (the repository's models were deleted at the second start). Only names the store
    makes are touched; a file set aside is swept too (rmtree left it)."""
    base = tmp_path / "cache"
    store = PreparedStore(base, None)
    key = "0123456789abcdef-" + "a" * 32 + "-" + "b" * 32 + "-ort1.32.0-0123456789ab"
    (base / key).mkdir()
    (base / "models" / "m" / "1").mkdir(parents=True)
    (base / "notes.txt").write_text("mine")
    (base / ".stale-notes.txt-1").write_text("mine too")
    (base / ".tmp-mine").mkdir()
    assert store.retire_unused(set(), set()) == [key]
    stale = [p.name for p in base.iterdir() if p.name.startswith(f".stale-{key}-")]
    assert len(stale) == 1
    (base / f".stale-{key}-2").write_text("a file set aside")
    store.close()
    PreparedStore(base, None).close()  # a start: its sweep
    assert sorted(p.name for p in base.iterdir()) == [".lock", ".stale-notes.txt-1", ".tmp-mine", "models", "notes.txt"]
