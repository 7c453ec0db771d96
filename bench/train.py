"""Trainer benchmarks on CPU, in one run:

  (a) pipeline overhead: the full trainer's step reading shards through the streaming loader vs the same
      model and step fed the same batches from memory (target <= 5 %), with 0 and 2 loader workers;
  (b) blotching cost per batch vs a training step (target <= 5 %), and vectorised vs the Python reference.

Run `python bench/train.py` (part of `make bench`). Timings on a shared 2-core machine vary by +-30 %: the
two pipelines alternate in short rounds and each figure is a median over steps.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.synthetic import EOS, PAD, SEP, VOCAB, arithmetic_rows  # noqa: E402
from tests.test_blotch import reference  # noqa: E402
from train.blotch import BlotchSpec, blotch  # noqa: E402
from train.config import load_config  # noqa: E402
from train.loss import token_loss  # noqa: E402
from train.build import build_model  # noqa: E402

DEMO = load_config(os.path.join(ROOT, "configs", "arithmetic.json"))
CMP_LEN, SEQ_LEN = DEMO.cmp_len, DEMO.seq_len  # the demo's windows and model


def windows(n: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    rows = arithmetic_rows(n, CMP_LEN, seq_len, max_terms=DEMO.max_ents, max_num=DEMO.max_num)
    return torch.from_numpy(rows.astype("int64"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_time(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def blotch_times(rows: torch.Tensor, spec: BlotchSpec) -> tuple[float, float]:
    """(vectorised, Python reference) seconds per batch."""
    sids = torch.arange(len(rows))
    row_list, sid_list = rows.tolist(), sids.tolist()
    return (median_time(lambda: blotch(rows, sids, 0, spec)),
            median_time(lambda: [reference(r, s, 0, spec, True) for r, s in zip(row_list, sid_list)], repeats=3))


def bench_blotch() -> dict[str, float]:
    cfg = DEMO
    torch.manual_seed(0)
    rows, sids = windows(cfg.batch_size), torch.arange(cfg.batch_size)
    spec = BlotchSpec(cmp_len=CMP_LEN, pad_id=PAD, eos_id=EOS, layout="padded", separator_ids=(SEP,),
                      blotch_p=cfg.blotch_p, seed=cfg.seed)
    t_vec, t_ref = blotch_times(rows, spec)
    t_vec_big, t_ref_big = blotch_times(windows(512, 500), spec)

    model = build_model(cfg, VOCAB, CMP_LEN + SEQ_LEN).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.l2)
    b = blotch(rows, sids, 0, spec)

    def step():
        loss = token_loss(model(b.input_ids, b.position_ids, b.mask), b.targets)
        (loss.objective / loss.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_step = median_time(step)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"blotching, batch {cfg.batch_size} x {CMP_LEN + SEQ_LEN} arithmetic windows, blotch_p {cfg.blotch_p}, "
          f"{torch.get_num_threads()} threads")
    print(f"  vectorised blotch      {t_vec * 1e3:8.3f} ms/batch")
    print(f"  Python reference       {t_ref * 1e3:8.3f} ms/batch   (vectorised is {t_ref / t_vec:.1f}x faster)")
    print(f"  at batch 512 x {CMP_LEN + 500}:     vectorised {t_vec_big * 1e3:.2f} ms, reference {t_ref_big * 1e3:.1f} ms "
          f"({t_ref_big / t_vec_big:.0f}x faster)")
    print(f"  training step          {t_step * 1e3:8.3f} ms/batch   (configs/arithmetic.json model, "
          f"{n_params / 1e6:.2f}M params)")
    print(f"  blotch / step          {100 * t_vec / t_step:8.2f} %          (target <= 5 %)")
    return {"blotch_ms": t_vec * 1e3, "reference_ms": t_ref * 1e3, "step_ms": t_step * 1e3,
            "blotch_512x512_ms": t_vec_big * 1e3, "reference_512x512_ms": t_ref_big * 1e3}


class MemoryStream:
    """Stands in for the trainer's TrainStream: the same (pass, batch) pairs, already in memory."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        self.i += 1
        return self.items[(self.i - 1) % len(self.items)]


class TimedStream:
    """The trainer's stream, counting the time the step waits for data."""

    def __init__(self, stream):
        self.stream, self.seconds = stream, 0.0

    def next(self):
        t = time.perf_counter()
        item = self.stream.next()
        self.seconds += time.perf_counter() - t
        return item


def bench_pipeline(n_workers: int, rounds: int = 10, steps: int = 6) -> dict[str, float]:
    from tests.conftest import write_dataset
    from train.loop import build, train_step

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    write_dataset(f"{tmp}/arith", {"train": 8000, "val": 250}, cmp_len=CMP_LEN, seq_len=SEQ_LEN,
                  content="arithmetic", samples_per_shard=1000)
    cfg = DEMO.replace(
        data_root=tmp, dataset="arith", name=None, cmp_len=None, seq_len=None, n_workers=n_workers)
    for sub in "abc":
        os.makedirs(f"{tmp}/{sub}")
    shards_run, memory_run = build(cfg, f"{tmp}/a", None), build(cfg, f"{tmp}/b", None)
    memory_run.stream = MemoryStream([build(cfg, f"{tmp}/c", None).stream.next() for _ in range(steps * rounds)])
    shards_run.stream = TimedStream(shards_run.stream)
    times: dict[str, list[float]] = {"shards": [], "memory": [], "wait": []}
    for r in range(rounds):  # alternate which goes first, so load changes on a shared machine hit both alike
        pair = [("shards", shards_run), ("memory", memory_run)]
        for name, run in pair if r % 2 else pair[::-1]:
            for _ in range(steps):
                t, waited = time.perf_counter(), shards_run.stream.seconds
                train_step(run)
                times[name].append(time.perf_counter() - t)
                if name == "shards":
                    times["wait"].append(shards_run.stream.seconds - waited)
    # medians without the first round (worker start-up, first shard reads, allocator warm-up)
    t_shards, t_memory, t_wait = (statistics.median(times[k][steps:]) for k in ("shards", "memory", "wait"))
    print(f"pipeline, batch {cfg.batch_size} x {CMP_LEN + SEQ_LEN} arithmetic windows, {n_workers} loader workers, "
          f"median of {steps * (rounds - 1)} steps each")
    print(f"  step reading shards    {t_shards * 1e3:8.2f} ms   of which waiting for data {t_wait * 1e3:.3f} ms "
          f"({100 * t_wait / t_shards:.2f} %)")
    print(f"  step from memory       {t_memory * 1e3:8.2f} ms")
    print(f"  step-time overhead     {100 * (t_shards / t_memory - 1):8.2f} %          (target <= 5 %)")
    return {"shards_ms": t_shards * 1e3, "memory_ms": t_memory * 1e3, "wait_ms": t_wait * 1e3}


if __name__ == "__main__":
    results = {f"pipeline_{w}_workers": bench_pipeline(w) for w in (0, 2)}
    results["blotch"] = bench_blotch()
    print(json.dumps(results))
