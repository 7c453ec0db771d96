"""The streaming reader against real datasets on disk: exactly once, equal batches, determinism, elastic resume.

Every token of sample i is i % vocab_size (the `make_dataset` fixture), so each batch is checked against the
sample ids it claims: a wrong row, shard or offset cannot pass unnoticed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards import StreamingDataLoader, StreamingDataset
from shards.partition import Partition
from shards.shuffle import EpochOrder

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

VOCAB = 70000  # > the sample count, so token values identify samples exactly (uint32 tokens)


def check_batch(batch, batch_size, with_label=False):
    ids = batch["sample_id"]
    assert ids.dtype.is_floating_point is False and ids.shape == (batch_size,)
    assert batch["input_ids"].dtype.is_floating_point is False
    assert (batch["input_ids"] == (ids % VOCAB)[:, None]).all(), "tokens do not belong to the sample ids"
    if with_label:
        assert (batch["label"] == ids % 2).all()
    return ids.tolist()


def run_ranks(url, world, batch_size, workers, *, state=None, limit=None, seed=0, with_label=False, **kw):
    """Batches of each rank (lists of sample-id lists) and the state after them; `limit` stops each rank early."""
    per_rank, states = [], []
    for rank in range(world):
        ds = StreamingDataset(url, rank=rank, world_size=world, seed=seed, **kw)
        dl = StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers)
        if state is not None:
            dl.load_state_dict(json.loads(json.dumps(state)))
        batches = []
        for batch in dl:
            batches.append(check_batch(batch, batch_size, with_label))
            if limit is not None and len(batches) == limit:
                break
        per_rank.append(batches)
        states.append(dl.state_dict())
    assert all(s == states[0] for s in states), "ranks disagree on the position"
    return per_rank, states[0]


def flat(per_rank):
    return [i for batches in per_rank for b in batches for i in b]


def global_batches(per_rank):
    """Step k's global batch: the union of every rank's k-th batch."""
    return [sorted(i for batches in per_rank for i in batches[k]) for k in range(len(per_rank[0]))]


# ---------------------------------------------------------------- partition and order logic, in-process


@pytest.mark.parametrize("mode", ["none", "full", "block"])
def test_partition_full_grid_exactly_once(mode):
    """All world sizes 1-5, workers 0-3, batch sizes that divide and that do not divide the split."""
    counts = [10] * 9 + [7]  # 97 samples, a short last shard
    for epoch in (0, 1):
        order = EpochOrder(counts, seed=5, epoch=epoch, mode=mode, block_shards=3)
        assert sorted(order.ids(0, order.total)) == list(range(97))
        for world in range(1, 6):
            for batch in (1, 3, 4, 97):
                g = world * batch
                if g > 97:
                    continue
                seen, nbatches = [], set()
                for rank in range(world):
                    part = Partition(97, 0, batch, world, rank)
                    for workers in (1, 2, 3):
                        for group in (1, 2, 5):
                            got = [j for w in range(workers) for g in part.worker_groups(w, workers, group) for j in g]
                            assert sorted(got) == list(range(part.num_batches))
                    nbatches.add(part.num_batches)
                    seen.extend(order.ids_at(part.positions(range(part.num_batches))).ravel().tolist())
                assert len(nbatches) == 1, "ranks yield different batch counts"
                assert len(seen) == len(set(seen)) == 97 - 97 % g
                assert set(seen) == set(order.ids(0, 97 - 97 % g).tolist())


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    block=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    cut=st.floats(0, 1),
)
def test_block_order_is_a_permutation_with_local_windows(counts, block, seed, cut):
    order = EpochOrder(counts, seed=seed, epoch=3, mode="block", block_shards=block)
    total = order.total
    mid = int(cut * total)
    ids = np.concatenate([order.ids(0, mid), order.ids(mid, total)])
    assert sorted(ids.tolist()) == list(range(total))
    # any span inside one block reads at most `block` shards, and `shards()` names all it reads
    lo, hi = int(order.block_starts[0]), int(order.block_starts[1])
    used = set(order.shard_of(order.ids(lo, hi)).tolist())
    assert len(used) <= block and used <= set(order.shards(lo, hi))


def test_order_depends_on_seed_and_epoch_only():
    counts = [50] * 8
    a = EpochOrder(counts, 1, 0, "block", 2).ids(0, 400)
    assert (a == EpochOrder(counts, 1, 0, "block", 2).ids(0, 400)).all()
    assert not (a == EpochOrder(counts, 1, 1, "block", 2).ids(0, 400)).all()
    assert not (a == EpochOrder(counts, 2, 0, "block", 2).ids(0, 400)).all()


# ---------------------------------------------------------------- real loaders, both formats


@pytest.mark.parametrize(
    "fmt,world,workers,batch",
    [
        ("arrow", 1, 0, 4),
        ("arrow", 2, 2, 5),  # 10 divides 100
        ("arrow", 3, 1, 7),
        ("arrow", 4, 3, 3),
        ("webdataset", 1, 3, 6),
        ("webdataset", 2, 0, 10),
        ("webdataset", 5, 2, 4),
    ],
)
def test_exactly_once_equal_batches(tmp_path, make_dataset, fmt, world, workers, batch):
    make_dataset(str(tmp_path), {"train": 100}, fmt=fmt, samples_per_shard=9, vocab_size=VOCAB, with_label=True)
    per_rank, state = run_ranks(str(tmp_path), world, batch, workers, with_label=True)
    assert len({len(b) for b in per_rank}) == 1, "ranks yield different numbers of batches"
    seen = flat(per_rank)
    g = world * batch
    assert len(seen) == len(set(seen)) == 100 - 100 % g
    ds = StreamingDataset(str(tmp_path), rank=0, world_size=world, batch_size=batch)
    assert len(ds) == len(per_rank[0]) * batch
    assert state["epoch"] == 1 and state["position"] == 0


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_batches_stay_the_callers_after_later_reads(tmp_path, make_dataset, fmt):
    """Reading in-process reuses staging buffers from read to read (1,024 samples); every batch handed out
    must keep its rows when the loader goes on, here over seven reads."""
    make_dataset(str(tmp_path), {"train": 7000}, fmt=fmt, samples_per_shard=500, vocab_size=VOCAB, with_label=True)
    batches = list(StreamingDataLoader(StreamingDataset(str(tmp_path), seed=0), batch_size=16))
    seen = [i for b in batches for i in check_batch(b, 16, with_label=True)]
    assert len(seen) == len(set(seen)) == 7000 - 7000 % 16


def test_same_global_batches_for_any_topology(tmp_path, make_dataset):
    make_dataset(str(tmp_path), {"train": 120}, samples_per_shard=11, vocab_size=VOCAB)
    url = str(tmp_path)
    reference = global_batches(run_ranks(url, 1, 12, 0)[0])
    assert global_batches(run_ranks(url, 3, 4, 2)[0]) == reference
    assert global_batches(run_ranks(url, 2, 6, 3)[0]) == reference
    assert global_batches(run_ranks(url, 1, 12, 0, seed=1)[0]) != reference
    ds = StreamingDataset(url, seed=0)
    ds.set_epoch(1)
    other_epoch = [sorted(b["sample_id"].tolist()) for b in StreamingDataLoader(ds, batch_size=12)]
    assert other_epoch != reference and sorted(sum(other_epoch, [])) == list(range(120))


def test_no_shuffle_reads_in_manifest_order(tmp_path, make_dataset):
    make_dataset(str(tmp_path), {"train": 30}, samples_per_shard=7, vocab_size=VOCAB)
    per_rank, _ = run_ranks(str(tmp_path), 2, 3, 1, shuffle=False)
    assert flat([[b for pair in zip(*per_rank) for b in pair]]) == list(range(30))


# ---------------------------------------------------------------- elastic resume


@pytest.mark.parametrize(
    "fmt,before,after",
    [  # (world, workers, batch) before and after the checkpoint
        ("arrow", (2, 2, 4), (3, 1, 4)),
        ("arrow", (4, 0, 3), (1, 3, 5)),
        ("webdataset", (1, 3, 6), (2, 0, 7)),
        ("webdataset", (3, 1, 2), (2, 2, 2)),
    ],
)
def test_elastic_resume_exactly_once(tmp_path, make_dataset, fmt, before, after):
    make_dataset(str(tmp_path), {"train": 101}, fmt=fmt, samples_per_shard=8, vocab_size=VOCAB)
    url = str(tmp_path)
    full = flat(run_ranks(url, 1, 1, 0, shuffle_block=2)[0])  # the epoch's global order, one sample per step
    (w1, nw1, b1), (w2, nw2, b2) = before, after
    first, state = run_ranks(url, w1, b1, nw1, limit=3, shuffle_block=2)
    assert state["position"] == 3 * w1 * b1 and state["epoch"] == 0
    rest, end = run_ranks(url, w2, b2, nw2, state=state, shuffle_block=2)
    seen_before, seen_after = flat(first), flat(rest)
    p, g = state["position"], w2 * b2
    assert sorted(seen_before) == sorted(full[:p]), "consumed part is not a prefix of the global order"
    n_after = (101 - p) // g * g
    assert sorted(seen_after) == sorted(full[p : p + n_after]), "resume replayed or skipped samples"
    assert end == {**state, "epoch": 1, "position": 0}


@settings(max_examples=80, deadline=None)
@given(
    total=st.integers(1, 300),
    before=st.tuples(st.integers(1, 5), st.integers(1, 9)),  # (world size, batch size)
    after=st.tuples(st.integers(1, 5), st.integers(1, 9)),
    consumed=st.integers(0, 40),
)
def test_repartition_after_resume_is_exactly_once(total, before, after, consumed):
    """Consume k global batches under one topology, the rest under another: every position at most once, all
    but fewer than the new global batch, and each rank still yields the same number of batches."""
    (w1, b1), (w2, b2) = before, after
    first = Partition(total, 0, b1, w1, 0)
    k = min(consumed, first.num_batches)
    positions = [p for r in range(w1) for p in Partition(total, 0, b1, w1, r).positions(range(k)).ravel().tolist()]
    start = k * w1 * b1
    parts = [Partition(total, start, b2, w2, r) for r in range(w2)]
    assert len({p.num_batches for p in parts}) == 1
    positions += [x for p in parts for x in p.positions(range(p.num_batches)).ravel().tolist()]
    assert len(positions) == len(set(positions))
    assert set(positions) == set(range(len(positions))) and total - len(positions) < w2 * b2


def test_resume_does_not_read_consumed_shards(tmp_path, make_dataset):
    """Resuming starts at the saved position: shards wholly before it are never opened, so deleting them is fine."""
    make_dataset(str(tmp_path), {"train": 60}, samples_per_shard=10, vocab_size=VOCAB)
    dl = StreamingDataLoader(StreamingDataset(str(tmp_path), shuffle=False), batch_size=5, num_workers=1)
    seen = [i for _, b in zip(range(5), dl) for i in b["sample_id"].tolist()]
    assert seen == list(range(25))
    state = dl.state_dict()
    for shard in ("shard-00000", "shard-00001"):  # samples 0-19, all consumed
        next((tmp_path / "train").glob(f"{shard}.*")).unlink()
    per_rank, _ = run_ranks(str(tmp_path), 2, 5, 2, state=state, shuffle=False)
    assert sorted(flat(per_rank)) == list(range(25, 55))


def test_resume_at_epoch_end_and_in_a_later_epoch(tmp_path, make_dataset):
    make_dataset(str(tmp_path), {"train": 40}, samples_per_shard=6, vocab_size=VOCAB)
    url = str(tmp_path)
    ds = StreamingDataset(url, seed=3)
    dl = StreamingDataLoader(ds, batch_size=5, num_workers=2)
    states = [dl.state_dict() for _ in dl]  # taken inside the loop, after each batch
    assert states[-1]["position"] == 40 and states[-1]["epoch"] == 0
    epoch1 = [sorted(b["sample_id"].tolist()) for b in dl]  # the loop ended: the loader moved to epoch 1
    # a checkpoint taken after the last batch of epoch 0 resumes with nothing left of epoch 0 ...
    ds2 = StreamingDataset(url, seed=3)
    dl2 = StreamingDataLoader(ds2, batch_size=5, num_workers=1)
    dl2.load_state_dict(json.loads(json.dumps(states[-1])))
    ds2.set_epoch(0)  # a training loop re-entering its saved epoch keeps the position
    assert list(dl2) == []
    # ... and then epoch 1 exactly as an uninterrupted run sees it
    assert [sorted(b["sample_id"].tolist()) for b in dl2] == epoch1
    # mid-epoch-1 checkpoint, resumed on two ranks
    ds3 = StreamingDataset(url, seed=3)
    dl3 = StreamingDataLoader(ds3, batch_size=5)
    ds3.set_epoch(1)
    head = [sorted(b["sample_id"].tolist()) for _, b in zip(range(3), dl3)]
    assert head == epoch1[:3]
    state = dl3.state_dict()
    assert (state["epoch"], state["position"]) == (1, 15)
    per_rank, _ = run_ranks(url, 2, 5, 1, state=state, seed=3)
    rest = sorted(flat(per_rank))
    assert rest == sorted(sum(epoch1[3:], [])[:20]), "later-epoch resume on 2 ranks"


def test_state_is_checked_against_the_dataset(tmp_path, make_dataset):
    make_dataset(str(tmp_path), {"train": 20}, vocab_size=VOCAB)
    state = StreamingDataLoader(StreamingDataset(str(tmp_path), seed=1), batch_size=2).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this dataset has seed=2"):
        StreamingDataLoader(StreamingDataset(str(tmp_path), seed=2), batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="position 99 is outside"):
        StreamingDataLoader(StreamingDataset(str(tmp_path), seed=1), batch_size=2).load_state_dict({**state, "position": 99})


def test_bad_topology_fails_at_construction(tmp_path, make_dataset):
    make_dataset(str(tmp_path), {"train": 20}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        StreamingDataset(str(tmp_path), rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        StreamingDataLoader(StreamingDataset(str(tmp_path)), batch_size=0)


# ---------------------------------------------------------------- integrity (local files)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_damaged_local_shard_names_the_shard(tmp_path, make_dataset, fmt, damage):
    make_dataset(str(tmp_path), {"train": 30}, fmt=fmt, samples_per_shard=10, vocab_size=VOCAB)
    shard = next((tmp_path / "train").glob("shard-00001.*"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-700])
    else:
        shard.unlink()
    dl = StreamingDataLoader(StreamingDataset(str(tmp_path)), batch_size=3, num_workers=2)
    with pytest.raises(Exception, match="shard-00001"):
        list(dl)


# ---------------------------------------------------------------- environment


def test_imports_without_optional_packages(tmp_path, make_dataset):
    """The GPU machine has no torchdata, webdataset or datasets."""
    make_dataset(str(tmp_path), {"train": 12}, vocab_size=VOCAB)
    code = (
        "import sys\n"
        "for m in ('torchdata', 'webdataset', 'datasets', 's3fs'): sys.modules[m] = None\n"
        "from shards import StreamingDataset, StreamingDataLoader\n"
        f"dl = StreamingDataLoader(StreamingDataset({str(tmp_path)!r}), batch_size=4)\n"
        "print(sum(len(b['sample_id']) for b in dl))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "12"
