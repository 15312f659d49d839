"""The seams that keep file access inside where it belongs (issue #16): openat2 beneath a directory, the one
model-file opener, external-data files, the workers' Landlock read set, and directories the daemon must own.
Real files, real syscalls; the live attacks are in tests/attack/."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from openinfer.daemon.files.beneath import open_beneath
from openinfer.daemon.files.model_files import ModelFileError, open_model
from openinfer.daemon.workerpool.pool import worker_read_paths
from openinfer.daemon.files.private_dir import UnsafeDirectory, open_private_dir
from openinfer.daemon.worker.external_data import ExternalDataError, check_prepared_refs, map_external_files
from openinfer.daemon.worker.external_refs import ExternalRef

pytestmark = pytest.mark.unit

USER = "user tester (uid 1)"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """repo/m/1/{model.onnx, w.bin, sub/x.bin, link.bin -> w.bin}, outside/secret, repo/m/2 -> ../m/1"""
    version = tmp_path / "repo" / "m" / "1"
    (version / "sub").mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"model")
    (version / "w.bin").write_bytes(b"weights")
    (version / "sub" / "x.bin").write_bytes(b"x")
    (version / "link.bin").symlink_to("w.bin")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (tmp_path / "repo" / "m" / "2").symlink_to("1")
    return tmp_path


def test_open_beneath_opens_inside_and_refuses_every_way_out(tree: Path) -> None:
    dir_fd = os.open(tree / "repo" / "m" / "1", os.O_PATH | os.O_DIRECTORY)
    try:
        fd = open_beneath(dir_fd, "sub/x.bin", os.O_RDONLY)
        assert os.read(fd, 10) == b"x"
        os.close(fd)
        for path, code in [("../../../outside/secret", errno.EXDEV), (str(tree / "outside" / "secret"), errno.EXDEV),
                           ("link.bin", errno.ELOOP), ("/proc/self/root/etc/passwd", errno.EXDEV)]:
            with pytest.raises(OSError) as refused:
                open_beneath(dir_fd, path, os.O_RDONLY)
            assert refused.value.errno == code, path
    finally:
        os.close(dir_fd)


def test_the_model_opener_follows_no_symlink_and_stays_in_the_repository(tree: Path) -> None:
    repo = str(tree / "repo")
    version_dir, fd = open_model(repo, f"{repo}/m/1/model.onnx", USER)
    assert os.read(fd, 10) == b"model"
    os.close(fd)
    os.close(version_dir)
    with pytest.raises(ModelFileError, match="symlink inside the model repository"):
        open_model(repo, f"{repo}/m/2/model.onnx", USER)
    with pytest.raises(ModelFileError, match="not inside the model repository"):
        open_model(repo, str(tree / "outside" / "secret"), USER)


def test_external_files_are_mapped_from_inside_the_version_directory_only(tree: Path) -> None:
    version = tree / "repo" / "m" / "1"
    dir_fd = os.open(version, os.O_PATH | os.O_DIRECTORY)
    try:
        files = map_external_files([ExternalRef("A", "w.bin"), ExternalRef("B", "sub/x.bin"), ExternalRef("C", "./w.bin")], dir_fd, str(version))
        assert {name: bytes(buffer) for name, buffer in files.buffers.items()} == {"w.bin": b"weights", "sub/x.bin": b"x", "./w.bin": b"weights"}
        files.close()
        for location, why in [("../../../outside/secret", "climbs out"), (str(tree / "outside" / "secret"), "absolute path"),
                              ("link.bin", "symlink"), ("sub", "not a regular file"), ("nope.bin", "does not exist"), (None, "no location")]:
            with pytest.raises(ExternalDataError, match=why) as refused:
                map_external_files([ExternalRef("W", "w.bin"), ExternalRef("evil", location)], dir_fd, str(version))
            assert "tensor 'evil'" in str(refused.value)
    finally:
        os.close(dir_fd)


def test_a_prepared_model_may_only_name_plain_files_of_its_own_directory(tree: Path) -> None:
    version = tree / "repo" / "m" / "1"
    dir_fd = os.open(version, os.O_PATH | os.O_DIRECTORY)
    try:
        check_prepared_refs([ExternalRef("W", "w.bin")], dir_fd, str(version))
        for location in ["sub/x.bin", "../1/w.bin", "link.bin", "sub", "", "missing.bin"]:
            with pytest.raises(ExternalDataError, match="tensor 'W'"):
                check_prepared_refs([ExternalRef("W", location)], dir_fd, str(version))
    finally:
        os.close(dir_fd)


def test_the_workers_read_set_never_holds_the_repository_or_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), str(repo / "inside"), "/", *sys.path])  # e.g. `python -m` from there
    (repo / "inside").mkdir()
    paths = worker_read_paths([repo])
    assert paths and not any(str(repo).startswith(p.rstrip("/") + "/") or p.startswith(str(repo)) or p == "/" for p in paths), paths
    assert str(tmp_path) not in paths


def test_a_private_directory_must_be_ours_and_closed_to_others(tmp_path: Path) -> None:
    fd = open_private_dir(tmp_path / "fresh", 0o711, "runtime directory")
    os.close(fd)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o711
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(UnsafeDirectory, match="writable by others"):
        open_private_dir(tmp_path / "open", 0o711, "runtime directory")
    (tmp_path / "link").symlink_to(tmp_path / "fresh")
    with pytest.raises(UnsafeDirectory, match="is a symlink"):
        open_private_dir(tmp_path / "link", 0o711, "runtime directory")
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 65534, 65534)
        with pytest.raises(UnsafeDirectory, match="owned by uid 65534"):
            open_private_dir(tmp_path / "theirs", 0o711, "runtime directory")
