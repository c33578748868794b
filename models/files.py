"""Files that hold a person's data or a server's state, readable by their owner only: the
device's store, exports, fetched models and keys; the run store, checkpoints and results.

A new file is created with mode 0600 and a new folder with 0700, set explicitly so that a
permissive umask cannot widen them. A folder that already exists is left as it is (it may be
shared, such as ``/tmp``) unless asked to tighten it; the files fedpref creates in it are
still 0600. The device and the server both write such files, so this lives beside the model
contract that they share.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def make_private(path: str | Path, mode: int = FILE_MODE) -> None:
    """Set ``path``'s mode to ``mode`` (0600 for a file, 0700 for a folder) when this user owns
    it (the mode of someone else's file cannot be changed); nothing if it does not exist."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def private_folder(folder: str | Path, *, tighten: bool = False) -> Path:
    """``folder``, created (with any missing parents) readable by its owner only; ``tighten``:
    an existing ``folder`` (not its parents) is set to 0700 too."""
    folder = Path(folder)
    missing = []
    level = folder
    while not level.exists():
        missing.append(level)
        if level.parent == level:
            break
        level = level.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=FOLDER_MODE)
        except FileExistsError:  # made by another process meanwhile: its mode is its own
            continue
        os.chmod(path, FOLDER_MODE)  # mkdir's mode is filtered by the umask
    if tighten and not missing:
        make_private(folder, FOLDER_MODE)
    return folder


def create_private(path: str | Path) -> int:
    """Create ``path`` (which must not exist) for writing, mode 0600; returns its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # os.open's mode is filtered by the umask
    return fd


def open_private(path: str | Path, mode: str = "wb"):
    """Open ``path`` for writing from its start (created, or emptied if it exists), its mode
    0600 either way; a file object."""
    # O_NOFOLLOW: a link planted where the file goes is refused, not written through
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # os.open's mode is filtered by the umask, and an old file keeps its own
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600."""
    with open_private(path, "w") as f:
        f.write(text)


def replace_private(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, mode 0600: a temporary file of the same folder
    (mkstemp makes it 0600), synced, then renamed over ``path``, so that a reader sees the old
    file or the new one, never half of one."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def ensure_private_file(path: str | Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists (for SQLite, which creates a
    database 0644 and its -wal and -shm files with the database's mode); True if created."""
    try:
        fd = create_private(path)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def open_to_others(path: str | Path) -> bool:
    """True if accounts other than the owner may read or write ``path``."""
    return bool(Path(path).stat().st_mode & 0o077)
