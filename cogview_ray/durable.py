"""Local-disk writes that survive a power cut: fsync a file's bytes before it is named, and the
folder that names it after. Used by the run store's local backend and the model cache."""
from __future__ import annotations

import os
from typing import Callable, Iterable


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's names (a rename, a link, a new entry), to disk."""
    # a read-only descriptor is enough on Linux, whatever the file's mode
    fd = os.open(os.fspath(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a new local file and flush it before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(folder: str | os.PathLike, rels: Iterable[str]) -> None:
    """Flush every listed file below `folder`, then their folders, deepest first."""
    rels = list(rels)
    for rel in rels:
        fsync_path(os.path.join(folder, rel))
    parents = {os.path.dirname(os.path.join(folder, r)) for r in rels}
    for d in sorted(parents, key=lambda p: p.count(os.sep), reverse=True):
        fsync_path(d)


def makedirs(path: str) -> None:
    """`os.makedirs`, then flush the parent of every folder it created."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    if not missing:
        return
    os.makedirs(missing[0], exist_ok=True)
    for created in reversed(missing):
        fsync_path(os.path.dirname(created))


def place(fill: Callable[[str], None], tmp: str, dest: str, *, exclusive: bool) -> None:
    """Fill the temp file `tmp` (via `fill(tmp)`), flush it, then name it `dest` atomically:
    a hard link when `exclusive` (FileExistsError if `dest` exists), else a rename over it.
    No reader ever sees a partial object, and the temp file never outlives the call."""
    makedirs(os.path.dirname(tmp))
    makedirs(os.path.dirname(dest))
    try:
        fill(tmp)
        fsync_path(tmp)
        if exclusive:
            os.link(tmp, dest)
        else:
            os.replace(tmp, dest)
        fsync_path(os.path.dirname(dest))
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
