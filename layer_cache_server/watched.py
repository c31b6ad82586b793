"""Files the server re-reads when they change (token files, the TLS certificate and key).

A file's identity is its inode, size and modification time, read through symlinks: Kubernetes
updates a mounted Secret or ConfigMap by swapping the ``..data`` symlink to a new directory,
which gives every file a new inode, and an edit in place changes the size or the time. Polling
the identity is cheap (one ``stat`` a file a second) and needs no inotify, which does not see a
symlink swap of a parent. Nothing here holds anything open.
"""

from __future__ import annotations

import os
from pathlib import Path

FileIdentity = tuple[int, int, int]


def file_identity(path: Path) -> FileIdentity | None:
    """(inode, size, mtime in ns) of the file ``path`` leads to, or None if it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
