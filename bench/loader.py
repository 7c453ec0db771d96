"""Loader benchmark: the same ~50k windows of 1,024 uint16 tokens through our reader and its peers.

    python bench/loader.py [--samples 50000] [--batch 32] [--budget 8] [--repeats 3] [--rounds 2] [--peer_python PY]

Every loader shuffles and yields batches of `--batch` windows; a run stops after one epoch or `--budget`
seconds, whichever comes first, and the rate includes start-up (worker processes, index building), which a
training job pays every epoch. Local loaders report the best of `--repeats` runs, each in the same way; ours
and the raw limit alternate for `--rounds` rounds and the ratios use the best of all of them. Rows:
  ours            StreamingDataset + StreamingDataLoader on local Arrow (full shuffle) and on S3 (block shuffle;
                  cold cache: the download, sha256 check and cache write are inside the figure; then warm)
  hf-datasets     `load_from_disk` + torch DataLoader(shuffle=True), torch format
  webdataset      WebDataset(shardshuffle) + .shuffle(1000) + WebLoader, on the same windows as tar shards
  mosaic          MosaicML streaming (`mosaicml-streaming` or `streaming-community`), MDS shards
  litdata         LitData `optimize` + TokensLoader(block_size=1024)
  raw             pyarrow memory-mapped shards read in contiguous slices, converted like ours: the limit;
                  and batches of random rows of all windows in one in-memory array: what any full shuffle
                  pays for its access pattern, with no shards, memory maps or bookkeeping
  s3 cat_file     fsspec `cat_file` of every shard in turn from the same S3 server (best of 3): the download
                  limit. Plain `cat_file` makes s3fs HEAD then GET; ours asks for the manifest's size in one GET.
Peers that are not installed are skipped with the reason. The S3 server is moto's, in its own process.
Mosaic and LitData pin versions that clash with ours: `--peer_python` runs them in a venv of their own, which
`make bench` builds (torch pinned in the same pip command).
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable, Iterable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards import ShardWriter, SplitInfo, formats, save_manifest, storage  # noqa: E402
from shards.manifest import Manifest  # noqa: E402
from shards.shuffle import EpochOrder  # noqa: E402

WINDOW = 1024
REPEATS = 3  # runs per local loader, the best kept: single runs of ~0.1 s vary by +-30 % on a shared machine
SAMPLES_PER_SHARD = 2000  # 4 MB Arrow shards: 25 shards for 50k windows, enough for a block shuffle to matter


# ---------------------------------------------------------------- data, written once per format


def make_tokens(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, size=(n, WINDOW), dtype=np.uint16)


def write_ours(root: str, tokens: np.ndarray, fmt: str) -> None:
    fs, root = storage.open_fs(root)
    info = SplitInfo()
    per_sample = formats.bytes_per_sample(fmt, WINDOW, 2, 0)
    writer = ShardWriter(fs, root, "train", fmt, WINDOW, "uint16", [], shard_size=SAMPLES_PER_SHARD * per_sample,
                         on_commit=lambda s, _st: info.shards.append(s))
    writer.add(tokens, {}, np.zeros((len(tokens), 1), dtype=np.int64))
    writer.close()
    info.windows = info.documents = len(tokens)
    info.tokens = tokens.size
    save_manifest(fs, root, Manifest(
        name="bench", format=fmt, cmp_len=0, seq_len=WINDOW, dtype="uint16", vocab_size=50257, pad_id=50256,
        eos_id=50256, separator_ids=[], layout="packed", columns={}, tokenizer={"name": "none", "sha256": "", "path": ""},
        params={}, splits={"train": info}, package_version="bench"))


# ---------------------------------------------------------------- measuring


def measure(name: str, batches: Callable[[], Iterable], size: Callable[[object], int], total: int, budget: float,
            repeats: int | None = None) -> None:
    """The best of `repeats` runs (a run that stops on the budget is not repeated). Each run's rate covers the
    whole run, start-up included; the note says when its first batch came, the rate after it, and the CPU
    seconds of this process (all its threads; loader workers are other processes and not counted)."""
    repeats = repeats or REPEATS
    best = None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        n = first_n = 0
        first = None
        for batch in batches():
            n += size(batch)
            if first is None:
                first, first_n = time.perf_counter() - t0, n
            if n >= total or time.perf_counter() - t0 > budget:
                break
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = (n - first_n) / max(elapsed - first, 1e-9) if first is not None else 0.0
        if best is None or n / elapsed > best[0]:
            best = (n / elapsed, f"{n} samples; first batch {first or 0:.2f} s, then {after:,.0f}/s; cpu {cpu:.2f} s")
        if elapsed > budget:
            break
    report(name, best[0], best[1] + (f"; best of {repeats}" if repeats > 1 else ""))


def report(name: str, rate: float, note: str) -> None:
    print(f"  {name:<34} {rate:>11,.0f} samples/s {rate * WINDOW / 1e6:>8.1f} M tokens/s   ({note})", flush=True)
    print(f"RESULT\t{name}\t{rate}", flush=True)


def skipped(name: str, why: str) -> None:
    print(f"  {name:<34} skipped: {why}", flush=True)


def stub_torchvision() -> None:
    """Mosaic and LitData import torchvision at import time, for image datasets only. PyPI's torchvision
    wheel is built against CUDA torch and cannot load beside the CPU torch 2.13 wheel, so stand in an empty
    module for it; nothing on the token path touches it."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]

    class Stub(types.ModuleType):
        __path__: list[str] = []

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *a, **k: None})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            return Stub(spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


# ---------------------------------------------------------------- the loaders


def bench_ours(url: str, label: str, batch: int, total: int, budget: float, **kw) -> None:
    from shards import StreamingDataLoader, StreamingDataset

    for workers in (0, 2):
        def run():
            ds = StreamingDataset(url, seed=0, **kw)
            return StreamingDataLoader(ds, batch_size=batch, num_workers=workers)
        measure(f"ours {label} ({workers} workers)", run, lambda b: len(b["sample_id"]), total, budget)


def bench_raw(root: str, batch: int, total: int, budget: float) -> None:
    import torch

    paths = [os.path.join(root, "train", p) for p in sorted(os.listdir(os.path.join(root, "train")))]

    def run():
        for path in paths:
            tokens = formats.decode("arrow", path)["input_ids"]
            for i in range(0, len(tokens) - batch + 1, batch):
                yield torch.from_numpy(tokens[i : i + batch].astype(np.int64))
    measure("raw pyarrow mmap, contiguous", run, len, total, budget)

    every = np.concatenate([formats.decode("arrow", p)["input_ids"] for p in paths])  # in memory, untimed
    order = np.random.default_rng(0).permutation(len(every))

    def shuffled():
        for i in range(0, len(order) - batch + 1, batch):
            yield torch.from_numpy(every[np.sort(order[i : i + batch])].astype(np.int64))
    measure("raw numpy, random rows in memory", shuffled, len, total, budget)


def bench_hf(tokens: np.ndarray, work: str, batch: int, total: int, budget: float) -> None:
    try:
        import datasets
        import pyarrow as pa
        import torch
    except ImportError as e:
        return skipped("hf-datasets", str(e))
    path = os.path.join(work, "hf")
    arr = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), WINDOW)
    datasets.Dataset(pa.table({"input_ids": arr})).save_to_disk(path)
    for workers in (0, 2):
        def run():
            ds = datasets.load_from_disk(path).with_format("torch")
            return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
        measure(f"hf-datasets ({workers} workers)", run, lambda b: len(b["input_ids"]), total, budget)


def bench_webdataset(root: str, batch: int, total: int, budget: float) -> None:
    try:
        import webdataset as wds
    except ImportError as e:
        return skipped("webdataset", str(e))
    urls = sorted(os.path.join(root, "train", p) for p in os.listdir(os.path.join(root, "train")))
    for workers in (0, 2):
        def run():
            ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
                  .shuffle(1000).decode().to_tuple("input_ids.npy").batched(batch))
            return wds.WebLoader(ds, batch_size=None, num_workers=workers)
        measure(f"webdataset ({workers} workers)", run, lambda b: len(b[0]), total, budget)


def bench_mosaic(tokens: np.ndarray, work: str, batch: int, total: int, budget: float) -> None:
    try:
        stub_torchvision()
        import torch
        from streaming import MDSWriter, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory
    except Exception as e:
        return skipped("mosaic streaming", f"{type(e).__name__}: {e}")
    path = os.path.join(work, "mds")
    with MDSWriter(out=path, columns={"input_ids": f"ndarray:uint16:{WINDOW}"}, size_limit=SAMPLES_PER_SHARD * 2 * WINDOW + 4096) as w:
        for row in tokens:
            w.write({"input_ids": row})
    for workers in (0, 2):
        def run():
            clean_stale_shared_memory()
            ds = StreamingDataset(local=path, shuffle=True, shuffle_seed=0, batch_size=batch)
            return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
        measure(f"mosaic streaming ({workers} workers)", run, lambda b: len(b["input_ids"]), total, budget)


def _litdata_chunk(args):
    path, i = args
    import torch
    return torch.from_numpy(np.load(path, mmap_mode="r")[i * SAMPLES_PER_SHARD : (i + 1) * SAMPLES_PER_SHARD].reshape(-1).astype(np.int32))


def bench_litdata(work: str, batch: int, total: int, budget: float) -> None:
    try:
        stub_torchvision()
        import litdata
        from litdata.streaming.item_loader import TokensLoader
    except Exception as e:
        return skipped("litdata", f"{type(e).__name__}: {e}")
    src, out = os.path.join(work, "tokens.npy"), os.path.join(work, "litdata")
    litdata.optimize(fn=_litdata_chunk, inputs=[(src, i) for i in range(math.ceil(total / SAMPLES_PER_SHARD))],
                     output_dir=out, chunk_bytes="64MB", item_loader=TokensLoader(), num_workers=1, verbose=False)
    for workers in (0, 2):
        def run():
            ds = litdata.StreamingDataset(out, item_loader=TokensLoader(block_size=WINDOW), shuffle=True, seed=0)
            return litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=workers)
        measure(f"litdata, int32 ({workers} workers)", run, len, total, budget)


def shuffle_quality(counts: list[int], batch: int) -> None:
    """Mosaic's simulator scores a shuffle by how neighbouring samples' source shards differ; also the number of
    distinct shards a batch reads (what a reader must have open) and the shards touched per 1% of the epoch."""
    print(f"\nshuffle quality ({len(counts)} shards of {counts[0]} samples; batch {batch}):")
    print(f"  {'order':<22} {'mean |shard(i+1)-shard(i)|':>27} {'neighbour entropy (bits)':>25} {'shards per batch':>17} {'shards per 1%':>14}")
    for label, mode, block in [("none", "none", 1), ("block of 4 shards", "block", 4), ("block of 16 shards", "block", 16), ("full permutation", "full", 1)]:
        order = EpochOrder(counts, seed=0, epoch=0, mode=mode, block_shards=block)
        shard = order.shard_of(order.ids(0, order.total))
        diff = np.abs(np.diff(shard))
        p = np.bincount(diff) / len(diff)
        entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
        per_batch = np.mean([len(np.unique(shard[i : i + batch])) for i in range(0, len(shard) - batch, batch)])
        span = max(1, order.total // 100)
        per_pct = np.mean([len(np.unique(shard[i : i + span])) for i in range(0, len(shard) - span, span)])
        print(f"  {label:<22} {diff.mean():>27.2f} {entropy:>25.2f} {per_batch:>17.1f} {per_pct:>14.1f}")


# ---------------------------------------------------------------- S3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def bench_s3(endpoint: str, work: str, batch: int, total: int, budget: float) -> None:
    from shards import StreamingDataLoader, StreamingDataset

    opts = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
    fs, _ = storage.open_fs("s3://bench", opts)
    paths = sorted(fs.find("bench/ds/train"))
    tries = []
    for _ in range(3):  # the best of three: a shared machine and a fresh server make single runs noisy
        c0, t0 = time.process_time(), time.perf_counter()
        nbytes = sum(len(fs.cat_file(p)) for p in paths)
        tries.append((time.perf_counter() - t0, time.process_time() - c0))
    dt, cpu = min(tries)
    report("s3 cat_file, shard after shard", total / dt, f"{nbytes / dt / 1e6:.0f} MB/s; cpu {cpu:.2f} s; best of 3")
    for workers in (0, 2):
        caches = [tempfile.mkdtemp(dir=work) for _ in range(3)]  # three cold runs, as cat_file has three tries
        runs = [("cold", caches[0]), ("cold 2", caches[1]), ("cold 3", caches[2]), ("warm", caches[2])]
        for temperature, cache in runs:  # cold: every shard is downloaded inside the measurement
            def run():
                ds = StreamingDataset("s3://bench/ds", seed=0, storage_options=opts, cache_dir=cache)
                return StreamingDataLoader(ds, batch_size=batch, num_workers=workers)
            measure(f"ours s3 {temperature} cache ({workers} workers)", run, lambda b: len(b["sample_id"]), total, budget,
                    repeats=1)  # a repeat would find the cache warm


def process_cpu(pid: int) -> float:
    """CPU seconds another process has used (Linux /proc), to show what the S3 server takes from the client."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def upload(endpoint: str, local_root: str) -> None:
    opts = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
    fs, _ = storage.open_fs("s3://bench", opts)
    fs.mkdir("bench")
    fs.put(local_root + "/", "bench/ds", recursive=True)


GROUPS: dict[str, Callable[[argparse.Namespace], None]] = {
    "ours": lambda a: bench_ours(os.path.join(a.work, "arrow"), "arrow, full shuffle", a.batch, a.samples, a.budget,
                                 shuffle_block=0),
    "raw": lambda a: bench_raw(os.path.join(a.work, "arrow"), a.batch, a.samples, a.budget),
    "hf": lambda a: bench_hf(load_tokens(a.work), a.work, a.batch, a.samples, a.budget),
    "webdataset": lambda a: bench_webdataset(os.path.join(a.work, "wds"), a.batch, a.samples, a.budget),
    "mosaic": lambda a: bench_mosaic(load_tokens(a.work), a.work, a.batch, a.samples, a.budget),
    "litdata": lambda a: bench_litdata(a.work, a.batch, a.samples, a.budget),
    "s3": lambda a: bench_s3(a.endpoint, a.work, a.batch, a.samples, a.budget),
}


def load_tokens(work: str) -> np.ndarray:
    return np.load(os.path.join(work, "tokens.npy"), mmap_mode="r")


PEER_GROUPS = ("mosaic", "litdata")  # these run under --peer_python when given


def run_group(group: str, args: argparse.Namespace, work: str, endpoint: str) -> dict[str, float]:
    """Each library in a fresh interpreter: no threads, shared memory or imports left over from another."""
    python = args.peer_python if group in PEER_GROUPS and args.peer_python else sys.executable
    cmd = [python, os.path.abspath(__file__), "--group", group, "--work", work, "--endpoint", endpoint,
           "--samples", str(args.samples), "--batch", str(args.batch), "--budget", str(args.budget),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    rates = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT\t"):
            _, name, rate = line.split("\t")
            rates[name] = float(rate)
        elif line.strip():
            print(line, flush=True)
    if proc.returncode:
        print(f"  {group}: exited with status {proc.returncode}", flush=True)
    return rates


def main() -> None:
    global REPEATS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds per run at most")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="runs per local loader; the best is reported")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of ours and raw; ratios use the best")
    ap.add_argument("--peer_python", help="interpreter that has Mosaic streaming and LitData (their pins clash "
                    "with ours, so `make bench` gives them a venv of their own)")
    ap.add_argument("--group", choices=sorted(GROUPS), help=argparse.SUPPRESS)  # one group, in a child process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.group:
        REPEATS = args.repeats
        return GROUPS[args.group](args)
    work = tempfile.mkdtemp(prefix="bench-loader-")
    moto = None
    try:
        t0 = time.perf_counter()
        tokens = make_tokens(args.samples)
        np.save(os.path.join(work, "tokens.npy"), tokens)
        write_ours(os.path.join(work, "arrow"), tokens, "arrow")
        write_ours(os.path.join(work, "wds"), tokens, "webdataset")
        print(f"{args.samples} windows x {WINDOW} uint16 tokens, batch {args.batch}, {os.cpu_count()} CPUs; "
              f"data written in {time.perf_counter() - t0:.1f} s; each library runs in a fresh interpreter")
        rates: dict[str, float] = {}
        print("\nlocal disk:")
        for round_ in range(args.rounds):  # ours and the raw limit alternate, so a noisy spell hits both
            if args.rounds > 1:
                print(f" round {round_ + 1} of {args.rounds}")
            for group in ("ours", "raw"):
                for name, rate in run_group(group, args, work, "").items():
                    rates[name] = max(rate, rates.get(name, 0.0))
        for group in ("hf", "webdataset", "mosaic", "litdata"):
            rates |= run_group(group, args, work, "")
        print("\nS3 (moto server on 127.0.0.1, its own process):")
        try:
            moto, endpoint = start_moto()
            upload(endpoint, os.path.join(work, "arrow"))
            c0, t0 = process_cpu(moto.pid), time.perf_counter()
            rates |= run_group("s3", args, work, endpoint)
            print(f"  (the server used {process_cpu(moto.pid) - c0:.1f} CPU s of the section's "
                  f"{time.perf_counter() - t0:.1f} s on {os.cpu_count()} CPUs)")
        except Exception as e:
            skipped("s3", f"{type(e).__name__}: {e}")
        counts = [min(SAMPLES_PER_SHARD, args.samples - i) for i in range(0, args.samples, SAMPLES_PER_SHARD)]
        shuffle_quality(counts, args.batch)
        print_ratios(rates)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()
        shutil.rmtree(work, ignore_errors=True)


def print_ratios(rates: dict[str, float]) -> None:
    print("\nratios:")
    ours = max((r for k, r in rates.items() if k.startswith("ours arrow")), default=None)
    peers = {k: r for k, r in rates.items() if not k.startswith(("ours", "raw", "s3"))}
    if ours and peers:
        best = max(peers, key=peers.get)
        print(f"  ours local / best peer ({best}): {ours / peers[best]:.2f}x   (target >= 1.0)")
    raw = rates.get("raw pyarrow mmap, contiguous")
    if ours and raw:
        print(f"  ours local / raw bulk read: {ours / raw:.2f}x   (target >= 0.5)")
    rows = rates.get("raw numpy, random rows in memory")
    if ours and rows:
        print(f"  ours local / raw random rows in memory: {ours / rows:.2f}x   (no target: the cost of the order itself)")
    s3 = [r for k, r in rates.items() if k.startswith("ours s3 cold")]
    if s3 and "s3 cat_file, shard after shard" in rates:
        best = max(s3) / rates["s3 cat_file, shard after shard"]
        print(f"  ours S3, best cold-cache run / cat_file, best of 3: {best:.2f}x   (target >= 0.8)")


if __name__ == "__main__":
    main()
