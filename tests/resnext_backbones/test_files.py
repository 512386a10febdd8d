"""resnext_backbones.files.atomic_write: the one way the library and the tasks write a file or folder that must
appear whole (downloads, checkpoints, prediction results, the embedded data set)."""

import os
import stat

import pytest

from resnext_backbones import files
from resnext_backbones.files import atomic_write


def test_the_bytes_reach_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recorded_replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", recorded_fsync)
    monkeypatch.setattr(files.os, "replace", recorded_replace)
    with atomic_write(tmp_path / "result.json") as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".result.json.")  # beside it: a rename, not a copy
        temp.write_text("{}")
        events.append(("written", None))
    assert (tmp_path / "result.json").read_text() == "{}"
    assert events == [("written", None), ("fsync", temp.name), ("replace", "result.json"), ("fsync", tmp_path.name)]


def test_a_folder_appears_whole_with_its_files_flushed(tmp_path, monkeypatch):
    flushed = []
    fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                       fsync(fd)))
    with atomic_write(tmp_path / "data", folder=True) as temp:
        (temp / "train").mkdir()
        (temp / "train" / "a.png").write_bytes(b"png")
        assert not (tmp_path / "data").exists()
    assert (tmp_path / "data" / "train" / "a.png").read_bytes() == b"png"
    assert {os.path.basename(p) for p in flushed} >= {"a.png", "train", temp.name, tmp_path.name}


def test_a_failure_leaves_the_target_as_it_was_and_no_temporary(tmp_path):
    (tmp_path / "last.ckpt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "last.ckpt") as temp:
            temp.write_text("half")
            raise KeyboardInterrupt
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "data", folder=True) as temp:
            (temp / "train").mkdir()
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt").read_text() == "old"


def test_a_folder_that_another_process_built_first_is_kept(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "theirs").write_text("whole")
    with pytest.raises(OSError):
        with atomic_write(tmp_path / "data", folder=True) as temp:
            (temp / "mine").write_text("whole too")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["theirs"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_result_has_the_permissions_of_any_new_file_whatever_made_the_temporary(tmp_path, umask):
    """A download moved onto the temporary is 0o600 (tempfile's mode); the cache's file must not be."""
    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "weights.pth") as temp:
            download = tmp_path / "download"
            download.write_bytes(b"weights")
            download.chmod(0o600)
            os.replace(download, temp)
        with atomic_write(tmp_path / "data", folder=True):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "weights.pth").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o777 & ~umask
