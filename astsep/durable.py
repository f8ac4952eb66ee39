"""Making what was written or renamed survive a crash; standard library only.

No torch and no numpy: ``python -m astsep.delivery`` imports it and must start fast.
"""

from __future__ import annotations

import os

__all__ = ["fsync_path"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder after files in it were created, renamed or removed (best effort:
    a path that cannot be opened or synced, e.g. on a file system without folder fsync, is skipped)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
