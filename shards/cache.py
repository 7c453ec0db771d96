"""Whole shards on local disk: direct paths for a local dataset, a verified download cache for a remote one.

Remote shards are downloaded whole (one `cat_file` is several times faster than ranged reads), checked
against the manifest's size and sha256 once on download, and renamed into place, so a file in the cache is
always complete and correct. Cache files are named by content hash, so datasets sharing a `cache_dir` never
collide and a rewritten dataset never reads a stale shard. Every process of a node (ranks and loader workers)
shares the cache: a per-shard lock makes one of them download while the others wait, and a cache-wide lock
serialises eviction. Eviction is least-recently-used and runs before a download reserves its bytes, so the
cache holds at most `cache_limit` (plus one shard when everything left is in flight). Deleting a shard another
process still reads is safe on POSIX: its memory map or decoded copy stays valid.

Filesystem clients are created lazily in the process that uses them, never inherited across a fork.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec

from shards import storage
from shards.manifest import SHARD_SUFFIX, ShardInfo
from shards.verify import VerifyError, check_shard_bytes, check_shard_size

CACHE_SUFFIXES = (*SHARD_SUFFIX.values(), ".part")  # shards of every format, and reservations in flight


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "shards-cache")


@contextmanager
def _flock(path: str) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ShardCache:
    """Turns a shard index into a local file path that is safe to read."""

    def __init__(
        self,
        url: str,
        shards: list[ShardInfo],
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
        retries: int = 4,
        backoff: float = 0.5,
        prefetch_threads: int = 2,
    ):
        self.url, self.shards, self.storage_options = url, shards, storage_options
        self.cache_limit, self.retries, self.backoff = cache_limit, retries, backoff
        self.prefetch_threads = prefetch_threads
        fs, self.root = storage.open_fs(url, storage_options)
        self.local = storage.is_local(fs)
        self.cache_dir = None if self.local else os.path.abspath(cache_dir or default_cache_dir())
        self._owner: int | None = None  # pid that created the per-process state below
        self._own(fs)

    def __getstate__(self) -> dict[str, Any]:  # a filesystem client or thread pool never crosses processes
        return {k: v for k, v in self.__dict__.items() if k not in ("_fs", "_pool", "_pending")} | {"_owner": None}

    def _own(self, fs: fsspec.AbstractFileSystem | None = None) -> None:
        """Per-process state, rebuilt after a fork: the parent's client and threads do not exist here."""
        if self._owner != os.getpid():
            opts = {**(self.storage_options or {}), "skip_instance_cache": True}
            self._fs = fs or storage.open_fs(self.url, opts)[0]
            self._pool: ThreadPoolExecutor | None = None
            self._pending: dict[int, Future] = {}
            self._owner = os.getpid()

    @property
    def fs(self):
        self._own()
        return self._fs

    def shard_url(self, i: int) -> str:
        return storage.display_url(self.fs, storage.join(self.root, self.shards[i].path))

    def path(self, i: int) -> str:
        """A local path holding shard i, complete and matching the manifest."""
        if self.local:
            return self._local_path(i)
        self._own()
        future = self._pending.pop(i, None)
        if future is not None:
            future.result()
        return self._download(i)

    def prefetch(self, indices: list[int]) -> None:
        """Start downloading these shards in background threads (no-op for local data)."""
        if self.local:
            return
        self._own()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="shard-prefetch")
        for i in indices:
            if i not in self._pending:
                self._pending[i] = self._pool.submit(self._download, i)

    def cancel(self) -> None:
        """Drop queued prefetches (the pass ended or failed); downloads already running finish on their own."""
        if self.local or self._owner != os.getpid() or self._pool is None:
            return
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._pending = None, {}

    # ------------------------------------------------------------ local

    def _local_path(self, i: int) -> str:
        """Local shards are size-checked on open (catches truncation); `shards verify` checks their sha256."""
        path = storage.join(self.root, self.shards[i].path)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise VerifyError(f"{path}: missing") from None
        check_shard_size(self.shards[i], size, path)
        return path

    # ------------------------------------------------------------ remote

    def _dest(self, i: int) -> str:
        info = self.shards[i]
        return os.path.join(self.cache_dir, f"{info.sha256[:20]}{os.path.splitext(info.path)[1]}")

    def _present(self, dest: str, info: ShardInfo) -> bool:
        try:
            if os.path.getsize(dest) != info.bytes:
                return False
            os.utime(dest)  # the LRU clock
            return True
        except FileNotFoundError:
            return False

    def _download(self, i: int) -> str:
        info, dest = self.shards[i], self._dest(i)
        if self._present(dest, info):
            return dest
        os.makedirs(self.cache_dir, exist_ok=True)
        with _flock(dest + ".lock"):
            if self._present(dest, info):  # another process fetched it while we waited
                return dest
            part = dest + ".part"
            self._reserve(part, info.bytes)
            try:
                data = self._fetch(i)
                check_shard_bytes(info, data, self.shard_url(i))
                with open(part, "r+b") as f:
                    f.write(data)
                os.replace(part, dest)
            finally:
                if os.path.exists(part):
                    os.remove(part)
        return dest

    def _fetch(self, i: int) -> bytes:
        """Retry transient failures with exponential backoff; a missing shard is not transient."""
        path = storage.join(self.root, self.shards[i].path)
        for attempt in range(self.retries + 1):
            try:  # the manifest gives the size: one ranged GET, where a plain cat_file makes s3fs HEAD first
                return self.fs.cat_file(path, start=0, end=self.shards[i].bytes)
            except FileNotFoundError:
                raise VerifyError(f"{self.shard_url(i)}: missing") from None
            except PermissionError as e:
                raise storage.StorageError(f"{self.shard_url(i)}: permission denied ({e})") from e
            except Exception as e:  # 5xx, connection reset, timeout: fsspec surfaces them as assorted types
                if attempt == self.retries:
                    raise storage.StorageError(
                        f"{self.shard_url(i)}: download failed after {attempt + 1} attempts ({type(e).__name__}: {e})"
                    ) from e
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _reserve(self, part: str, size: int) -> None:
        """Evict least-recently-used shards until `size` more bytes fit, then claim them with a sized file."""
        with _flock(os.path.join(self.cache_dir, ".lock")):
            if self.cache_limit is not None:
                files = sorted(self._entries())
                used = sum(f[1] for f in files)
                for _, nbytes, name in files:
                    if used + size <= self.cache_limit:
                        break
                    if not name.endswith(".part"):  # in-flight downloads belong to someone
                        os.remove(os.path.join(self.cache_dir, name))
                        used -= nbytes
            with open(part, "wb") as f:
                f.truncate(size)

    def _entries(self) -> Iterator[tuple[float, int, str]]:
        """(mtime, bytes, name) of the shards and reservations in the cache folder now."""
        for name in os.listdir(self.cache_dir):
            if name.endswith(CACHE_SUFFIXES):
                try:
                    st = os.stat(os.path.join(self.cache_dir, name))
                except FileNotFoundError:  # evicted while we listed
                    continue
                yield st.st_mtime, st.st_size, name

    def cached_bytes(self) -> int:
        """Bytes the cache folder holds now (shards and reservations)."""
        if self.cache_dir is None or not os.path.isdir(self.cache_dir):
            return 0
        return sum(nbytes for _, nbytes, _ in self._entries())
