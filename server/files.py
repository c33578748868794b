"""Files that hold a server's state (the run store, checkpoints): readable by their owner only.

A new file is created with mode 0600 and a new folder with 0700, set explicitly so that a
permissive umask cannot widen them. A folder that already exists is left as it is (it may be
shared, such as ``/tmp``); the files fedpref creates in it are still 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_folder(folder: str | Path) -> Path:
    """``folder``, created (with any missing parents) readable by its owner only."""
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
    return folder


def create_private(path: str | Path) -> int:
    """Create ``path`` (which must not exist) for writing, mode 0600; returns its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # os.open's mode is filtered by the umask
    return fd


def open_private(path: str | Path, mode: str = "wb"):
    """Open ``path`` for writing from its start (created, or emptied if it exists), its mode
    0600 either way; a file object."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
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
