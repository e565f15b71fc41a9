"""What "nothing was rewritten" compares: a file's inode, size, mtime and content hash.

An mtime alone misses a rewrite that keeps it (a copy with preserved times, a coarse-clock file
system); a replacement by rename changes the inode, an edit in place changes the hash or the size.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_state(path: str | os.PathLike) -> tuple[int, int, int, str]:
    """(inode, size in bytes, mtime in ns, sha256 hex) of one file."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_state(paths) -> dict[str, tuple[int, int, int, str]]:
    """{path as str: file_state} of every given file, e.g. `files_state(cache.glob("shard-*"))`."""
    return {str(p): file_state(p) for p in sorted(paths)}
