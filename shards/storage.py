"""Local paths and fsspec URLs behind one small interface.

Writers must never leave a file that looks complete but is not: a local file is written under a temporary
name and renamed into place; an object store PUT is already all-or-nothing, so it is written directly.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, BinaryIO, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(RuntimeError):
    """A read or write failed; the message names the path."""


def first_line(e: Exception, limit: int = 300) -> str:
    """An exception as the one line our errors quote (library messages can run to pages)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for `url` and the path inside it (no protocol)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def write_local_atomic(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Let `write` fill a temporary file, then rename it to `path`: a kill never leaves half a file there."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"  # remove_stale_temps() knows this pattern
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing or the whole file."""
    if is_local(fs):
        write_local_atomic(path, lambda f: f.write(data))
    else:
        fs.pipe_file(path, data)


def remove_stale_temps(fs: fsspec.AbstractFileSystem | None, path: str) -> int:
    """Delete temporary files that a killed writer left under `path` (only local writes use them)."""
    fs = fs or LocalFileSystem()
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    stale = fs.glob(join(path, "**", "*.tmp-*"))
    for f in stale:
        fs.rm_file(f)
    return len(stale)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # network and permission errors get the path attached
        raise StorageError(f"cannot read {path}: {e}") from e


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.exists(path)


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload_dir(fs: fsspec.AbstractFileSystem, local_dir: str, path: str) -> None:
    """Copy every file of a local folder to `path`, each file atomically."""
    for name in sorted(os.listdir(local_dir)):
        src = os.path.join(local_dir, name)
        if os.path.isfile(src):
            with open(src, "rb") as f:
                write_atomic(fs, join(path, name), f.read())


def display_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for messages, never with credentials (fsspec paths carry none)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)
