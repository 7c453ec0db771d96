"""The epoch order: which sample id sits at each global position of an epoch.

The order is a pure function of (seed, epoch, the shards' sample counts, the shuffle mode), never of world
size or worker count, which is what lets a run resume elastically: a checkpoint only needs the position.

Modes:
- "none": manifest order.
- "full": one permutation of the whole split. Best mixing; every batch touches many shards, so it is meant for
  local memory-mapped Arrow where touching a shard costs nothing.
- "block": shard-aware, like MosaicML's py1br. Shards are permuted, cut into blocks of `block_shards`
  consecutive shards, and the samples of each block are permuted. A reader then needs only the shards of the
  current block (and the next, for prefetch), so downloads and the cache stay bounded. Each block's
  permutation is seeded on its own, so any position range can be computed without the rest of the epoch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.random import SeedSequence, default_rng  # imported here, not on first use: forked workers inherit it

MODES = ("none", "full", "block")


def _rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    return default_rng(SeedSequence([seed, epoch, *stream]))


class EpochOrder:
    def __init__(self, counts: Sequence[int], seed: int, epoch: int, mode: str, block_shards: int = 1):
        if mode not in MODES:
            raise ValueError(f"shuffle mode {mode!r} is not one of {MODES}")
        if mode == "block" and block_shards < 1:
            raise ValueError(f"block_shards must be >= 1, got {block_shards}")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])  # sample id of each shard's first sample
        self.total = int(self.offsets[-1])
        self.seed, self.epoch, self.mode = seed, epoch, mode
        if mode == "full":
            self._perm = _rng(seed, epoch, 0).permutation(self.total)
        elif mode == "block":
            shard_perm = _rng(seed, epoch, 0).permutation(len(self.counts))
            self.blocks = [shard_perm[i : i + block_shards] for i in range(0, len(shard_perm), block_shards)]
            sizes = [int(self.counts[b].sum()) for b in self.blocks]
            self.block_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._block_cache: dict[int, np.ndarray] = {}

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, ids, side="right") - 1

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Sample ids at global positions [start, stop)."""
        return self.ids_at(np.arange(start, stop, dtype=np.int64))

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at an array of global positions, in its shape: a reader looks up all the batches of one
        read at once, whatever their stride over the ranks."""
        if positions.size and not (0 <= positions.min() and positions.max() < self.total):
            raise IndexError(f"positions {positions.min()}..{positions.max()} outside the epoch of {self.total} samples")
        if self.mode == "none":
            return positions.astype(np.int64, copy=True)
        if self.mode == "full":
            return self._perm[positions]
        block = np.searchsorted(self.block_starts, positions, side="right") - 1
        out = np.empty(positions.shape, dtype=np.int64)
        for b in np.unique(block):  # a read spans one block or two
            at = block == b
            out[at] = self._block(int(b))[positions[at] - self.block_starts[b]]
        return out

    def shards(self, start: int, stop: int) -> list[int]:
        """The shards that positions [start, stop) read, in order of first use: what to prefetch."""
        if self.mode == "block":
            lo = int(np.searchsorted(self.block_starts, start, side="right")) - 1
            hi = int(np.searchsorted(self.block_starts, stop, side="left"))
            return [int(s) for b in range(lo, hi) for s in self.blocks[b]]
        shard = self.shard_of(self.ids(start, stop))
        _, first = np.unique(shard, return_index=True)
        return [int(s) for s in shard[np.sort(first)]]

    def _block(self, b: int) -> np.ndarray:
        if b not in self._block_cache:
            if len(self._block_cache) >= 4:  # a reader moves forward: the oldest block is done
                self._block_cache.pop(next(iter(self._block_cache)))
            ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in self.blocks[b]])
            self._block_cache[b] = _rng(self.seed, self.epoch, 1, b).permutation(ids)
        return self._block_cache[b]
