"""Atomic files and folders: whole or absent, with the umask's permissions, temporaries of dead processes
removed, and unwritable outputs refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from circuitmap import atomic
from circuitmap.errors import CircuitmapError


def _fill(folder, text: str) -> None:
    (folder / "a.txt").write_text(text)
    (folder / "b.txt").write_text(text)


def test_files_and_folders_get_the_umasks_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        path = atomic.atomic_write(tmp_path / "file.txt", lambda temporary: temporary.write_text("x"))
        folder = atomic.replace_folder(tmp_path / "folder", lambda staging: _fill(staging, "x"))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640
    assert folder.stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("exchange", [True, False])
def test_a_folder_is_replaced_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    folder = atomic.replace_folder(tmp_path / "set", lambda staging: _fill(staging, "old"))
    atomic.replace_folder(folder, lambda staging: _fill(staging, "new"))
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    assert {p.read_text() for p in folder.iterdir()} == {"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["set"]

    def half(staging):
        (staging / "a.txt").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.replace_folder(folder, half)
    assert {p.read_text() for p in folder.iterdir()} == {"new"} and [p.name for p in tmp_path.iterdir()] == [
        "set"
    ]


def test_temporaries_of_dead_processes_are_removed_and_others_kept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = [tmp_path / f".set.incoming-{pid}-0123abcd", tmp_path / f".page.html.tmp-{pid}-89abcdef"]
    stale[0].mkdir()
    stale[1].write_text("half")
    live = tmp_path / f".set.incoming-{os.getpid()}-0123abcd"
    live.mkdir()
    kept = [tmp_path / ".hidden", tmp_path / f".x.incoming-{pid}-nothex00"]
    kept[0].write_text("mine")
    kept[1].mkdir()
    atomic.atomic_write(tmp_path / "out.txt", lambda temporary: temporary.write_text("x"))
    assert not any(path.exists() for path in stale)
    assert live.exists() and all(path.exists() for path in kept)


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CircuitmapError, match="cannot write the graph folder .*: .*file is not a folder"):
        atomic.check_writable(tmp_path / "file" / "sub" / "graph", "the graph folder")
    atomic.check_writable(tmp_path / "new" / "deeper" / "graph")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "the check leaves nothing behind"
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(CircuitmapError, match="Permission denied"):
            atomic.check_writable(locked / "out.json")
