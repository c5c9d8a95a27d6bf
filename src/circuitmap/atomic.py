"""Files and folders written so that a reader, or a crash, never sees half of one.

- ``atomic_write(path, write)``: ``write`` fills a temporary file beside ``path``, which is flushed to disk
  and renamed over ``path``; on any failure the temporary file goes and ``path`` is as it was.
- ``replace_folder(path, fill)``: ``fill`` fills a staging folder beside ``path``, which then takes the place
  of the old folder in one step (the two are exchanged where the system can, else renamed one after the
  other), and the old one is deleted.
- Temporaries are named ``.<name>.<role>-<pid>-<random>``: a process killed mid-write leaves one behind, and
  the next write in the same folder removes every temporary whose process is gone.
- Written files and folders get the permissions the process's umask allows, as ordinary writes do.
- ``check_writable(path)``: a one-line error, before any work, when ``path`` cannot be written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from circuitmap.errors import CircuitmapError

_TEMPORARY = re.compile(r"^\..+\.(?:tmp|incoming|old)-(\d+)-[0-9a-f]{8}$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary)`` on a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``; on any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    temporary = _temporary(path, "tmp")
    try:
        with open(temporary, "xb"):
            pass
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def replace_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(staging)`` on a new folder beside ``path``, then put it in the place of ``path`` (which
    may not exist yet) in one step; on any failure the staging folder is removed and ``path`` is left as it
    was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CircuitmapError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    staging = _temporary(path, "incoming")
    try:
        staging.mkdir()
        fill(staging)
        _sync(staging)
        if not path.exists():
            staging.rename(path)
        elif _exchange(staging, path):
            shutil.rmtree(staging, ignore_errors=True)
        else:
            retired = _temporary(path, "old")
            path.rename(retired)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        _sync(path.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def remove_stale(folder: Path) -> None:
    """Delete the temporaries in ``folder`` that belong to processes which no longer run."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or _running(int(match.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def check_writable(path: str | Path, what: str = "the output") -> None:
    """A one-line error when nothing can be written at ``path`` (a file or folder to create or replace):
    tried by creating and removing a temporary file in the nearest existing folder."""
    path = Path(path)
    folder = path.parent if not path.is_dir() else path
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CircuitmapError(f"cannot write {what} {path}: {folder} is not a folder")
    probe = _temporary(folder / "probe", "tmp")
    try:
        with open(probe, "xb"):
            pass
    except OSError as error:
        raise CircuitmapError(f"cannot write {what} {path}: {error.strerror or error}") from None
    probe.unlink(missing_ok=True)


def _temporary(path: Path, role: str) -> Path:
    return path.with_name(f".{path.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(second))


def _sync(folder: Path) -> None:
    """Flush a folder's entries to disk, so that a rename into it survives a crash."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _umask() -> int:
    """The process's umask, read without changing it where the system says it."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
