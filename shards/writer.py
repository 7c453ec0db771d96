"""Cut a stream of windows into fixed-count shards and commit each one atomically.

The number of samples per shard comes from the byte budget and the window size alone, so shard boundaries
(and therefore every shard's bytes) depend only on the stream of windows, never on timing or process count.
Each window travels with the writer's caller-defined resume state (an int64 row): when a shard is committed
the state of its last window is handed to `on_commit`, which is what lets an interrupted run restart there.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import fsspec
import numpy as np

from shards import formats, storage
from shards.manifest import SHARD_SUFFIX, ShardInfo

OnCommit = Callable[[ShardInfo, np.ndarray], None]


def shard_path(split: str, index: int, fmt: str) -> str:
    return f"{split}/shard-{index:05d}{SHARD_SUFFIX[fmt]}"


def samples_per_shard(fmt: str, window: int, dtype: str, n_extra_columns: int, shard_size: int) -> int:
    """Samples in every shard but a split's last. A function of the byte budget and the window alone, so a planner
    that never sees the windows (preprocess --executor ray) cuts the same shards as the writer."""
    per_sample = formats.bytes_per_sample(fmt, window, np.dtype(dtype).itemsize, n_extra_columns)
    return max(1, shard_size // per_sample)


class ShardWriter:
    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        split: str,
        fmt: str,
        window: int,
        dtype: str,
        extra_columns: list[str],
        shard_size: int,
        on_commit: OnCommit,
        first_shard: int = 0,
        first_sample: int = 0,
    ):
        self.fs, self.root, self.split, self.fmt = fs, root, split, fmt
        self.window, self.dtype, self.extra_columns = window, np.dtype(dtype), list(extra_columns)
        self.samples_per_shard = samples_per_shard(fmt, window, dtype, len(extra_columns), shard_size)
        self.on_commit = on_commit
        self.next_shard, self.next_sample = first_shard, first_sample
        self._tokens: list[np.ndarray] = []
        self._extras: dict[str, list[np.ndarray]] = {c: [] for c in self.extra_columns}
        self._states: list[np.ndarray] = []
        self._pending = 0

    def add(self, tokens: np.ndarray, extras: dict[str, np.ndarray], states: np.ndarray) -> None:
        if len(tokens) == 0:
            return
        self._tokens.append(tokens.astype(self.dtype, copy=False))
        for c in self.extra_columns:
            self._extras[c].append(np.asarray(extras[c], dtype=np.int64))
        self._states.append(states)
        self._pending += len(tokens)
        while self._pending >= self.samples_per_shard:
            self._commit(self.samples_per_shard)

    def close(self) -> None:
        if self._pending:
            self._commit(self._pending)

    def _take(self, parts: list[np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        joined = np.concatenate(parts)
        return joined[:n], ([joined[n:]] if len(joined) > n else [])

    def _commit(self, n: int) -> None:
        tokens, self._tokens = self._take(self._tokens, n)
        extras = {}
        for c in self.extra_columns:
            extras[c], self._extras[c] = self._take(self._extras[c], n)
        states, self._states = self._take(self._states, n)
        self._pending -= n
        data = formats.encode(self.fmt, tokens, extras, self.next_sample)
        rel = shard_path(self.split, self.next_shard, self.fmt)
        storage.write_atomic(self.fs, storage.join(self.root, rel), data)
        info = ShardInfo(path=rel, samples=n, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        self.next_shard += 1
        self.next_sample += n
        self.on_commit(info, states[-1])
