"""The reader against a real S3 server on 127.0.0.1 (moto), through a fault-injecting proxy, and in real DDP."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from shards import StreamingDataLoader, StreamingDataset, load_manifest, storage
from shards.verify import VerifyError
from shards.storage import StorageError
from tests.faultproxy import FaultProxy
from tests.test_streaming import VOCAB, check_batch

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def read_all(ds, batch_size, workers=0, each=None):
    ids = []
    for batch in StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers):
        ids += check_batch(batch, batch_size)
        if each is not None:
            each()
    return ids


def proxied(opts, proxy):
    """Client options that go through the proxy; botocore's own retries off, so faults reach s3fs and us."""
    return {**opts, "client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {**opts["config_kwargs"], "retries": {"max_attempts": 1}}}


@pytest.mark.timeout(120)
def test_s3_cache_limit_and_prefetch(s3_bucket, make_dataset, tmp_path):
    url, opts = s3_bucket
    make_dataset(f"{url}/ds", {"train": 160}, samples_per_shard=8, vocab_size=VOCAB, storage_options=opts)
    fs, root = storage.open_fs(f"{url}/ds", opts)
    shard_bytes = max(s.bytes for s in load_manifest(fs, root).splits["train"].shards)
    limit = 5 * shard_bytes  # two blocks of two shards, plus one
    cache = tmp_path / "cache"
    ds = StreamingDataset(f"{url}/ds", storage_options=opts, cache_dir=str(cache), cache_limit=limit, shuffle_block=2)
    it = iter(StreamingDataLoader(ds, batch_size=4))
    first = check_batch(next(it), 4)
    deadline = time.time() + 30  # the next block is fetched in the background while we hold still
    while len([p for p in cache.iterdir() if p.suffix == ".arrow"]) < 4 and time.time() < deadline:
        time.sleep(0.05)
    assert len([p for p in cache.iterdir() if p.suffix == ".arrow"]) >= 4, "next block not prefetched"
    peak = [0]

    def watch():
        peak[0] = max(peak[0], ds.cache.cached_bytes())

    ids = first
    for batch in it:
        ids += check_batch(batch, 4)
        watch()
    assert sorted(ids) == list(range(160))
    assert peak[0] <= limit + shard_bytes, f"cache held {peak[0]} bytes, limit {limit}"
    assert opts["secret"] not in json.dumps(ds.state_dict()), "credentials in the loader state"
    with pytest.raises(ValueError, match="cache_limit .* cannot hold"):
        StreamingDataset(f"{url}/ds", storage_options=opts, cache_dir=str(cache), cache_limit=shard_bytes, shuffle_block=2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt,context", [("arrow", None), ("webdataset", "fork")])
def test_s3_workers_exactly_once(s3_bucket, make_dataset, tmp_path, fmt, context):
    """Forkserver (the default for remote data) or forked workers make their own clients; two ranks share one
    cache folder."""
    url, opts = s3_bucket
    make_dataset(f"{url}/ds", {"train": 90}, fmt=fmt, samples_per_shard=7, vocab_size=VOCAB, storage_options=opts)
    seen = []
    for rank in range(2):
        ds = StreamingDataset(f"{url}/ds", rank=rank, world_size=2, storage_options=opts, cache_dir=str(tmp_path))
        for batch in StreamingDataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context=context):
            seen += check_batch(batch, 5)
    assert len(seen) == len(set(seen)) == 90


@pytest.mark.timeout(120)
def test_faults_lose_and_duplicate_nothing(s3_server, s3_bucket, make_dataset, tmp_path):
    url, opts = s3_bucket
    make_dataset(f"{url}/ds", {"train": 95}, samples_per_shard=8, vocab_size=VOCAB, storage_options=opts)
    proxy = FaultProxy(s3_server, "/train/shard-", ["ok", "503", "ok", "drop"])
    try:
        ds = StreamingDataset(f"{url}/ds", storage_options=proxied(opts, proxy), cache_dir=str(tmp_path), seed=4)
        ids = read_all(ds, 4)
    finally:
        proxy.close()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 92  # 95 less the remainder of 3
    assert proxy.counts["503"] >= 5 and proxy.counts["drop"] >= 5, proxy.counts


@pytest.mark.timeout(120)
def test_persistent_failure_is_a_clear_error(s3_server, s3_bucket, make_dataset, tmp_path):
    url, opts = s3_bucket
    make_dataset(f"{url}/ds", {"train": 20}, samples_per_shard=10, vocab_size=VOCAB, storage_options=opts)
    proxy = FaultProxy(s3_server, "/train/shard-", ["503"])
    try:
        ds = StreamingDataset(f"{url}/ds", storage_options=proxied(opts, proxy), cache_dir=str(tmp_path), retries=1)
        with pytest.raises(StorageError, match=r"s3://.*/train/shard-0000[01]\.arrow: download failed after 2 attempts"):
            read_all(ds, 2)
    finally:
        proxy.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "damage,message,workers",
    [("flip", "sha256", 0), ("truncate", "bytes, manifest says", 2), ("missing", "missing", 0)],
)
def test_damaged_remote_shard_names_the_shard(s3_bucket, make_dataset, tmp_path, damage, message, workers):
    url, opts = s3_bucket
    make_dataset(f"{url}/ds", {"train": 30}, fmt="webdataset", samples_per_shard=10, vocab_size=VOCAB, storage_options=opts)
    fs, root = storage.open_fs(f"{url}/ds", opts)
    path = storage.join(root, "train/shard-00001.tar")
    data = fs.cat_file(path)
    if damage == "flip":
        fs.pipe_file(path, data[:600] + bytes([data[600] ^ 1]) + data[601:])
    elif damage == "truncate":
        fs.pipe_file(path, data[:-1024])
    else:
        fs.rm(path)
    ds = StreamingDataset(f"{url}/ds", storage_options=opts, cache_dir=str(tmp_path))
    with pytest.raises((VerifyError, RuntimeError), match=rf"train/shard-00001\.tar.*{message}"):
        read_all(ds, 3, workers=workers)
    bad = ds.cache._dest(1)
    assert not os.path.exists(bad) and not os.path.exists(bad + ".part"), "a bad download was kept"


# ---------------------------------------------------------------- real DDP: two processes, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, port: int, url: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = StreamingDataset(url, seed=7)  # rank and world size come from torch.distributed
        dl = StreamingDataLoader(ds, batch_size=3, num_workers=1)
        ids, steps = [], 0
        for batch in dl:
            ids += check_batch(batch, 3)
            steps += 1
            torch.distributed.barrier()  # a rank with fewer batches would hang here
        counts = [None, None]
        torch.distributed.all_gather_object(counts, steps)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": ds.rank, "world": ds.world_size, "ids": ids, "counts": counts, "state": dl.state_dict()}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_two_processes(tmp_path, make_dataset):
    make_dataset(str(tmp_path / "ds"), {"train": 50}, samples_per_shard=6, vocab_size=VOCAB)
    mp.spawn(_ddp_rank, args=(_free_port(), str(tmp_path / "ds"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    assert results[0]["counts"] == [8, 8]  # 50 // 6 global batches of 2 x 3
    seen = results[0]["ids"] + results[1]["ids"]
    assert len(seen) == len(set(seen)) == 48
    assert results[0]["state"] == results[1]["state"]


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_local_and_s3_copies_give_the_same_order(s3_bucket, make_dataset, tmp_path, fmt):
    """The order is a function of (seed, epoch, the manifest's shards, shuffle_block) only: a dataset copied to
    object storage trains on the same order, for the default shuffle and for a full permutation."""
    url, opts = s3_bucket
    make_dataset(str(tmp_path / "ds"), {"train": 120}, fmt=fmt, samples_per_shard=10, vocab_size=VOCAB)
    make_dataset(f"{url}/ds", {"train": 120}, fmt=fmt, samples_per_shard=10, vocab_size=VOCAB, storage_options=opts)
    for block in ({}, {"shuffle_block": 0}):
        orders = []
        for where, kw in ((str(tmp_path / "ds"), {}), (f"{url}/ds", {"storage_options": opts,
                                                                     "cache_dir": str(tmp_path / "cache")})):
            ds = StreamingDataset(where, seed=3, **block, **kw)
            epochs = []
            for epoch in (0, 1):
                ds.set_epoch(epoch)
                epochs.append(read_all(ds, 4))
            orders.append(epochs)
        assert orders[0] == orders[1] and orders[0][0] != orders[0][1] and sorted(orders[0][0]) == list(range(120))
