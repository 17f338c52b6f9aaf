"""Atomic file writes: a temp file in the same folder, then rename. A reader never sees half a file,
and an interrupted run leaves no partial output behind (so resumable batch runs can trust what exists).
The file gets the mode any new file gets (0666 less the umask: 0644 usually), not the temp file's 0600."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask both sets and reads,
    which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: str, path: Path) -> None:
    """Gives the temp file a new file's mode, then renames it into place."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """The name of a temp file beside ``path`` for the caller to write; once the block ends it becomes
    ``path`` (a new file's mode, then a rename), and if the block raises it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes a text file atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)
