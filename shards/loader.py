"""StreamingDataLoader: a torch DataLoader over StreamingDataset that knows its place in the epoch.

Workers send messages of several whole numpy batches (one pickle per message, no per-sample hand-off, no
shared-memory tensor per sample); the main process checks they arrive in order, cuts them into batches of
tensors (widening the tokens to int64 on the way), and counts what it has *delivered to the caller*: batches
prefetched by workers but not yet handed out are not consumed, so a checkpoint taken inside the training loop
resumes exactly after the last batch trained on.
"""
from __future__ import annotations

import multiprocessing
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from shards.dataset import StreamingDataset


def _as_is(batch: Any) -> Any:
    """DataLoader's default conversion would make tensors in the worker and pass each through shared memory."""
    return batch


def _default_context(dataset: StreamingDataset, num_workers: int) -> multiprocessing.context.BaseContext | None:
    """Remote data: forkserver. Each worker makes its own client either way, but a fork copies every lock of
    every thread in the parent (s3fs's event loop, aiohttp's resolver, other libraries' pools), and in the
    benchmark, forking a process that had run other loaders left S3 workers stuck. The server imports torch
    and the clients once, so a worker starts in well under a second."""
    if num_workers == 0 or dataset.cache.local:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "shards.dataset", "s3fs", "gcsfs"])  # missing ones are skipped
    return ctx


def _batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """A message's batches, as tensors the caller owns. Read in this process, the columns are views of a
    staging buffer that the next read overwrites, so each is copied, the tokens widened to int64 in the same
    pass (numpy does it 20x faster than torch). `sample_id` is a fresh array per read already."""
    tokens, ids = arrays["input_ids"], arrays["sample_id"]
    extras = [(k, v) for k, v in arrays.items() if k not in ("input_ids", "sample_id")]
    for lo in range(0, len(ids), batch_size):
        hi = lo + batch_size
        batch = {"input_ids": torch.from_numpy(tokens[lo:hi].astype(np.int64)),
                 "sample_id": torch.from_numpy(ids[lo:hi])}
        for k, v in extras:
            batch[k] = torch.from_numpy(v[lo:hi].copy())
        yield batch


class StreamingDataLoader(DataLoader):
    """Yields dicts of tensors: `input_ids` (batch, window) int64, `sample_id` int64, and any extra columns.

    `batch_size` is the per-rank batch; it overrides the dataset's, since the partition is cut in batches.
    Workers on local data fork; on remote data they start from a forkserver (so a script needs the usual
    `if __name__ == "__main__":` guard). Either way each worker creates its own filesystem client and download
    threads on first use (see `cache.py`). `multiprocessing_context` overrides the choice.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int | None = None,
        num_workers: int = 0,
        *,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        timeout: float = 0,
        multiprocessing_context: Any = None,
    ):
        if batch_size is not None:
            dataset.batch_size = batch_size
        dataset.partition()  # fail here, not in a worker, on a bad batch size
        # Pinning happens here, after the tensors exist: DataLoader's pin thread would see numpy arrays.
        self.pin = pin_memory and torch.cuda.is_available()
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_as_is,
            prefetch_factor=prefetch_factor,
            timeout=timeout,
            multiprocessing_context=multiprocessing_context or _default_context(dataset, num_workers),
        )

    def __len__(self) -> int:
        """Batches per whole epoch on this rank."""
        return len(self.dataset) // self.dataset.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds: StreamingDataset = self.dataset
        part = ds.partition()
        # In-process reading skips DataLoader's per-batch fetcher and profiler hooks.
        it = super().__iter__() if self.num_workers > 0 else iter(ds)
        try:
            expected = 0
            for first, arrays in it:
                if first != expected:
                    raise RuntimeError(f"loader workers delivered batch {first} where batch {expected} was due")
                for batch in _batches(arrays, part.batch_size):
                    if self.pin:
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    expected += 1
                    ds.position = part.start + expected * part.global_batch
                    yield batch
        finally:
            # Stop workers now, on a break or an error too. Left to the garbage collector, torch's shutdown
            # can find its queues already finalised and wait 5 s per worker.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        ds.epoch, ds.position = ds.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Small and JSON-serialisable: the epoch, the position in its global order and what fixes the order."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
