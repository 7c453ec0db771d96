"""StreamingDataset: one rank's share of a split, as whole batches, in a global order that survives resumes.

The dataset yields messages `(first_batch_index, arrays)`: numpy arrays holding several consecutive batches
end to end, so the only per-sample work is numpy fancy indexing and loader workers hand one pickle per
message to the main process. `StreamingDataLoader` cuts them into tensors and keeps the place. Where the data
sits (local path or fsspec URL) only changes how a shard reaches local disk (`cache.py`); order
(`shuffle.py`) and partition (`partition.py`) are the same for both formats and all storages.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards import formats, storage
from shards.cache import ShardCache
from shards.manifest import Manifest, load_manifest
from shards.partition import Partition
from shards.shuffle import EpochOrder
from shards.verify import VerifyError, check_shard_arrays

STATE_VERSION = 1
DEFAULT_BLOCK_SHARDS = 16  # shards per shuffle block (MosaicML advises blocks >= 10 shards)
READ_SAMPLES = 1024  # samples read from the shards in one go (2 MB staging buffers for 1,024 uint16 tokens)
MESSAGE_SAMPLES = 256  # samples per worker-to-loader message: 8 batches of 32 moved 2x faster than 1 or 64


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingDataset(IterableDataset):
    """One split of a dataset folder written by `preprocess`, read by one rank.

    `shuffle_block` picks the shuffle: k > 0 shuffles within blocks of k shards (the default, 16, so a node
    only needs a block's shards at a time), 0 permutes the whole split (best mixing; meant for local Arrow,
    where memory maps make any access pattern cheap). The order depends on nothing else: where the data sits
    (a local copy or object storage) and its format never change it. `cache_limit` (bytes) must hold two
    blocks (the one being read and the one being prefetched), or the whole split for a full shuffle.
    `retries` and `download_threads` (per process) tune remote reads: against a local S3 server on 2 cores
    2 threads beat 4 and 8; a real object store, where each connection is slow, wants more.
    `manifest`: the dataset's manifest when the caller has loaded it already (one GET fewer per loader).
    The state never includes `storage_options`, which may hold credentials.
    """

    def __init__(
        self,
        path_or_url: str,
        split: str = "train",
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int = 1,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
        shuffle_block: int = DEFAULT_BLOCK_SHARDS,
        retries: int = 4,
        download_threads: int = 2,
        manifest: Manifest | None = None,
    ):
        self.manifest = manifest or load_manifest(*storage.open_fs(path_or_url, storage_options))
        self.url, self.split, self.seed, self.batch_size = path_or_url, split, seed, batch_size
        self.shards = self.manifest.split(split).shards
        self.counts = [s.samples for s in self.shards]
        self.total = sum(self.counts)
        # a resumed position only means something for the same shards: a rewritten dataset is refused
        self.fingerprint = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()[:16]
        self.cache = ShardCache(
            path_or_url, self.shards, storage_options, cache_dir, cache_limit, retries, prefetch_threads=download_threads
        )
        if shuffle_block < 0:
            raise ValueError(f"shuffle_block must be >= 0, got {shuffle_block}")
        self.shuffle_mode = "none" if not shuffle else "full" if shuffle_block == 0 else "block"
        self.block_shards = max(1, min(shuffle_block, len(self.shards)))
        if cache_limit is not None and self.shuffle_mode != "none":
            window = self.block_shards * 2 if self.shuffle_mode == "block" else None
            block = sorted((s.bytes for s in self.shards), reverse=True)[:window]
            if cache_limit < sum(block):
                raise ValueError(
                    f"cache_limit {cache_limit} bytes cannot hold the shards one shuffle window needs ({sum(block)} "
                    f"bytes); raise cache_limit or lower shuffle_block (now {shuffle_block})"
                )
        dist_rank, dist_world = _distributed()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        self.epoch, self.position = 0, 0
        self.partition()  # validates rank, world size and batch size now rather than in a worker

    # ------------------------------------------------------------ place in the epoch

    def partition(self) -> Partition:
        return Partition(self.total, self.position, self.batch_size, self.world_size, self.rank)

    def order(self) -> EpochOrder:
        return EpochOrder(self.counts, self.seed, self.epoch, self.shuffle_mode, self.block_shards)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is the epoch already in progress (a resumed one)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        """Samples this rank yields in a whole epoch (the remainder rule drops the tail)."""
        return self.total // (self.batch_size * self.world_size) * self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "samples": self.total,
            "data": self.fingerprint,
            "epoch": self.epoch,
            "position": self.position,  # samples of the epoch's global order already consumed
            "seed": self.seed,
            "shuffle": self.shuffle_mode,
            "shuffle_block": self.block_shards if self.shuffle_mode == "block" else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the place in `state`; the order must be the one it was saved under, the topology need not."""
        expected = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "position")}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this dataset has {key}={value!r}")
        if not 0 <= state["position"] <= self.total:
            raise ValueError(f"loader state position {state['position']} is outside the split of {self.total} samples")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """This worker's batches of the rest of the epoch, as messages: (index of the first batch, arrays of
        consecutive batches end to end).

        A message holds about MESSAGE_SAMPLES samples of consecutive batches, because a DataLoader queue costs
        ~100 us per message whatever its size while pickles of several MB cost more than they save. Several
        messages are read together (about READ_SAMPLES samples): one pass over the shards they touch serves them
        all, so per-shard Python work is paid per read, not per batch, when a full shuffle spreads every batch
        over every shard."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        part, order = self.partition(), self.order()
        # A worker's messages are pickled later by a queue thread, so only the main process reuses its buffer.
        reader = _ShardReader(self, capacity=self._open_shards_needed(part), reuse=info is None)
        ahead = self._prefetch_span(part)
        per_message, per_read = self._read_sizes(part, workers)
        messages = part.worker_groups(worker, workers, per_message)
        prefetched = part.start
        try:
            for first in range(0, len(messages), per_read):
                read = messages[first : first + per_read]
                positions = part.positions([j for group in read for j in group])
                end = int(positions[-1, -1]) + 1
                if prefetched < min(self.total, end + ahead):  # request the next span in one go, not per batch
                    stop = min(self.total, end + 2 * ahead)
                    self.cache.prefetch(order.shards(prefetched, stop))
                    prefetched = stop
                arrays = reader.gather(order.ids_at(positions), order)
                lo = 0
                for group in read:
                    hi = lo + len(group) * self.batch_size
                    yield group[0], {c: a[lo:hi] for c, a in arrays.items()}
                    lo = hi
        finally:
            self.cache.cancel()

    def _prefetch_span(self, part: Partition) -> int:
        """Positions whose shards to have on disk ahead of the reader: a block, or two shards' worth."""
        if self.shuffle_mode == "block":
            return int(np.diff(self.order().block_starts).max())
        return max(2 * max(self.counts), part.global_batch)

    def _read_sizes(self, part: Partition, workers: int) -> tuple[int, int]:
        """Batches per message and messages per read, for about MESSAGE_SAMPLES and READ_SAMPLES samples. Remote
        data reads at most a shard's span of positions at a time, so a read never needs more shards on disk
        than the prefetch window holds (on many ranks a message of 8 global batches could span blocks)."""
        span = max(self.counts) if not self.cache.local else self.total
        per_message = max(1, min(MESSAGE_SAMPLES // self.batch_size, span // part.global_batch))
        per_read = READ_SAMPLES // (per_message * self.batch_size)
        return per_message, max(1, min(per_read, span // (workers * per_message * part.global_batch)))

    def _open_shards_needed(self, part: Partition) -> int:
        if self.shuffle_mode == "full":
            return len(self.shards)
        per_batch = math.ceil(part.global_batch / max(1, min(self.counts))) + 1
        return (2 * self.block_shards if self.shuffle_mode == "block" else 2) + per_batch


class _ShardReader:
    """Decoded shards of one pass (memory maps for Arrow, arrays for tar), least recently used dropped first."""

    def __init__(self, ds: StreamingDataset, capacity: int, reuse: bool):
        self.ds, self.capacity, self.reuse = ds, capacity, reuse
        self.open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        m = ds.manifest
        self.columns = {formats.TOKENS: np.dtype(m.dtype), **{c: np.dtype(t) for c, t in m.columns.items()}}
        self.staging: dict[str, dict[str, np.ndarray]] = {"by_shard": {}, "by_batch": {}}

    def buffers(self, kind: str, n: int) -> dict[str, np.ndarray]:
        """Staging arrays for n samples, kept from read to read: "by_shard" always (it never leaves the reader),
        "by_batch" when `reuse`. Fresh multi-MB buffers per read come from the OS and go back to it, and the
        page faults of new memory cost more than the copies into it (measured on a 2-core VM: a 3x slower
        loader)."""
        reuse = self.reuse or kind == "by_shard"
        kept = self.staging[kind]
        if not reuse or not kept or len(kept[formats.TOKENS]) < n:
            window = self.ds.manifest.window
            kept = {c: np.empty((n, window) if c == formats.TOKENS else n, dtype=t) for c, t in self.columns.items()}
            if reuse:
                self.staging[kind] = kept
        return {c: a[:n] for c, a in kept.items()}

    def shard(self, i: int) -> dict[str, np.ndarray]:
        if i in self.open:
            self.open.move_to_end(i)
            return self.open[i]
        path = self.ds.cache.path(i)
        name = self.ds.cache.shard_url(i)
        try:
            arrays = formats.decode(self.ds.manifest.format, path, name)
        except formats.ShardFormatError as e:
            raise VerifyError(str(e)) from e
        check_shard_arrays(self.ds.manifest, self.ds.shards[i], arrays, name, scan_tokens=False)
        self.open[i] = arrays
        if len(self.open) > self.capacity:
            self.open.popitem(last=False)
        return arrays

    def gather(self, batches: np.ndarray, order: EpochOrder) -> dict[str, np.ndarray]:
        """The rows of the batches of sample ids (one batch a row of `batches`), end to end, each batch in
        sample-id order.

        All ids are sorted together, so each shard is one `take` into a staging buffer however many batches it
        serves; one scatter puts the rows in batch order, so that each batch is a contiguous slice that
        the loader widens in one cache-friendly pass, as it would a sequential read. No row is copied into new
        memory: in the main process both buffers are reused and the result is a view that the next read overwrites (the
        loader copies it); a worker's result is pickled later by a queue thread, so it gets a new buffer."""
        in_batch = np.sort(batches, axis=1).ravel()
        by_id = np.argsort(in_batch)  # ids are unique within an epoch
        sorted_ids = in_batch[by_id]
        cuts = np.searchsorted(sorted_ids, order.offsets)  # where each shard's ids begin
        local = sorted_ids - np.repeat(order.offsets[:-1], np.diff(cuts))  # row within its shard
        by_shard = self.buffers("by_shard", len(in_batch))
        for s in np.flatnonzero(np.diff(cuts)):
            lo, hi = cuts[s], cuts[s + 1]
            src = self.shard(int(s))
            for c, out in by_shard.items():
                np.take(src[c], local[lo:hi], axis=0, out=out[lo:hi], mode="clip")  # in range; "raise" buffers
        by_batch = self.buffers("by_batch", len(in_batch))
        for c, out in by_batch.items():
            out[by_id] = by_shard[c]  # staging row k holds the sample at batch row by_id[k]
        return {**by_batch, "sample_id": in_batch}
