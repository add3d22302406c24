"""Writing a file so that a reader never sees half of it: a temporary beside it, then a rename.

One policy for every file vramscope writes (meta.json, Parquet tables, summary caches,
exported snapshots, ablation results): the rename makes a write all-or-nothing against a
killed process. There is no fsync: meta.json is rewritten at every drain of a running
capture, and an fsync there would stall the training thread; a power loss can cost the
last write, never an older one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _temporary_beside(path: Path) -> tuple[Path, int]:
    """A new file in `path`'s folder, opened for writing: (its path, its descriptor).

    Created with the permissions a plain open() gives (0o666 less the umask), not
    mkstemp's 0o600: whoever could read a plainly written file can read this one.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it replaces `path`, else it is removed."""
    path = Path(path)
    tmp, fd = _temporary_beside(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` all at once."""
    path = Path(path)
    tmp, fd = _temporary_beside(path)
    try:
        with open(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
