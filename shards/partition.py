"""Which global positions of the epoch order a rank and one of its loader workers read.

From the resume point `start`, the rest of the epoch [start, total) is cut into global batches of
`batch_size * world_size` consecutive positions; rank r takes the r-th `batch_size` slice of each. The tail
that does not fill a global batch (fewer than `batch_size * world_size` samples) is dropped, so every rank
yields exactly the same number of full batches and DDP never waits on a rank that ran out. Within a rank,
groups of consecutive batches go round-robin to the loader workers, and the loader puts them back in order.

Nothing here depends on what was consumed before `start`: a resume with another world size or worker count
re-partitions the remaining positions, with no replay, no skip and no reading through consumed data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Partition:
    total: int  # samples in the epoch order
    start: int  # first global position not yet consumed
    batch_size: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if not 0 <= self.start <= self.total:
            raise ValueError(f"resume position {self.start} is outside the epoch of {self.total} samples")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_batches(self) -> int:
        """Batches every rank yields from `start` to the end of the epoch."""
        return (self.total - self.start) // self.global_batch

    def positions(self, batches: Sequence[int]) -> np.ndarray:
        """Global positions of this rank's batches (indices counted from `start`), one row per batch."""
        first = self.start + np.asarray(batches, dtype=np.int64) * self.global_batch + self.rank * self.batch_size
        return first[:, None] + np.arange(self.batch_size)

    def worker_groups(self, worker: int, num_workers: int, group: int) -> list[range]:
        """Worker w's batches: groups of `group` consecutive batches, dealt round-robin to the workers (each
        group is one message to the main process, which takes them round-robin, so they arrive in order)."""
        starts = range(worker * group, self.num_batches, num_workers * group)
        return [range(g, min(g + group, self.num_batches)) for g in starts]
