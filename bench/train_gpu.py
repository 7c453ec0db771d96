"""GPU training benchmark: a GPT-2-small-shaped model (124M parameters, windows of 1024 tokens) in bfloat16.

For every combination of {reading shards through the streaming loader, batches already in GPU memory} x
{blotch_p 0, 0.3} x {eager, torch.compile} it runs the trainer's own `train_step` (blotching, autocast, AdamW,
gradient clipping) and reports tokens/s (tokens the model actually processed: blotching excises some) and model
FLOPs utilisation, then the ratios the targets are about:

  MFU >= 40 %              6N + 12 L d T FLOPs per token (nanoGPT's estimate) over the GPU's dense bf16 peak
  pipeline overhead <= 2 %  step time reading shards / from memory - 1, same blotch_p and compile setting
  blotching overhead <= 3 % the blotch() call alone / the step, timed with the GPU synchronised

Needs torch, numpy, pyarrow and fsspec (and transformers for --model hf); not datasets, webdataset or torchdata,
and no network: the data is synthetic, written as a real shard dataset in a temporary folder.

  python bench/train_gpu.py                 # on a GPU machine
  python bench/train_gpu.py --smoke         # a tiny model on CPU, to check that everything runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shards import ShardWriter, SplitInfo, save_manifest, storage  # noqa: E402
from shards.manifest import Manifest  # noqa: E402
from train.blotch import blotch  # noqa: E402
from train.config import Config  # noqa: E402

# dense bf16 peak FLOP/s by device name (the first match wins)
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
SEP_IDS = (13, 198)  # GPT-2's "." and "\n": segments of text for blotching


def write_data(folder: str, n: int, cmp_len: int, seq_len: int, vocab: int, seed: int = 0) -> None:
    """Packed text-like windows (random tokens, a separator every 8-40 tokens) as an Arrow shard dataset."""
    rng = np.random.default_rng(seed)
    window = cmp_len + seq_len
    tokens = rng.integers(256, vocab, (n, window), dtype=np.int64)
    gaps = rng.integers(8, 40, (n, window))
    for i in range(n):  # separators at cumulative gaps
        cols = np.cumsum(gaps[i])
        cols = cols[cols < window]
        tokens[i, cols] = rng.choice(SEP_IDS, len(cols))
    fs, root = storage.open_fs(folder, None)
    splits = {}
    for split, rows in (("train", tokens), ("val", tokens[:64])):
        info = SplitInfo()
        writer = ShardWriter(fs, root, split, "arrow", window, "uint16", [], shard_size=256 * window * 2,
                             on_commit=lambda s, _st, info=info: info.shards.append(s))
        writer.add(rows.astype(np.uint16), {}, np.zeros((len(rows), 1), dtype=np.int64))
        writer.close()
        info.windows = info.documents = len(rows)
        info.tokens = len(rows) * window
        splits[split] = info
    save_manifest(fs, root, Manifest(
        name="bench", format="arrow", cmp_len=cmp_len, seq_len=seq_len, dtype="uint16", vocab_size=vocab, pad_id=0,
        eos_id=50256 % vocab, separator_ids=list(SEP_IDS), layout="packed", columns={},
        tokenizer={"name": "none", "sha256": "", "path": "tokenizer"}, params={}, splits=splits,
        package_version="bench"))


class MemoryStream:
    """The trainer's stream, replaced by batches already on the device."""

    def __init__(self, items: list, device: torch.device):
        self.items = [(p, {k: v.to(device) for k, v in b.items()}) for p, b in items]
        self.i = 0

    def next(self):
        self.i += 1
        return self.items[(self.i - 1) % len(self.items)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model: torch.nn.Module, n_layers: int, d: int, T: int) -> float:
    """nanoGPT's estimate: 6 per parameter per token (forward and backward) plus attention's 12 L d T."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 6 * n + 12 * n_layers * d * T


def measure(run, steps: int, warmup: int) -> dict[str, float]:
    """Median step time and total tokens/s over `steps` steps after `warmup`."""
    from train.loop import train_step

    device = run.ctx.device
    for _ in range(warmup):
        train_step(run)
    sync(device)
    times, tokens = [], 0.0
    for _ in range(steps):
        t = time.perf_counter()
        sums, _ = train_step(run)  # returns reduced sums: .tolist() already synchronises with the GPU
        sync(device)
        times.append(time.perf_counter() - t)
        tokens += sums["tokens"]
    return {"step_s": statistics.median(times), "tokens_per_s": tokens / sum(times), "tokens_per_step": tokens / steps}


def blotch_seconds(run, repeats: int = 20) -> float:
    """The blotch() call alone on the run's batches, synchronised."""
    device = run.ctx.device
    batches = [run.stream.next()[1] for _ in range(4)]
    batches = [(b["input_ids"].to(device), b["sample_id"]) for b in batches]
    for ids, sid in batches:
        blotch(ids, sid, 0, run.src.spec)
    sync(device)
    t = time.perf_counter()
    for i in range(repeats):
        ids, sid = batches[i % len(batches)]
        blotch(ids, sid, 0, run.src.spec)
    sync(device)
    return (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and windows, any device (checks it runs)")
    ap.add_argument("--model", choices=["transformer", "hf"], default="transformer",
                    help="the from-scratch transformer or transformers' GPT-2 (model_type hf)")
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--compile", choices=["both", "off", "on"], default="both")
    ap.add_argument("--n_workers", type=int, default=2, help="loader worker processes for the shards runs")
    ap.add_argument("--peak_tflops", type=float, help="the device's dense bf16 peak (default: by device name)")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        d, layers, heads, vocab, cmp_len, seq_len = 64, 2, 4, 1024, 16, 112
        batch, steps, warmup = args.batch_size or 4, args.steps or 3, args.warmup or 2
    else:
        d, layers, heads, vocab, cmp_len, seq_len = 768, 12, 12, 50257, 64, 960
        batch, steps, warmup = args.batch_size or 16, args.steps or 30, args.warmup or 8
    T = cmp_len + seq_len
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in name), None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tmp = tempfile.mkdtemp(prefix="bench-gpu-")
    n_samples = 4 * (warmup + steps + 4) * batch + 64
    t0 = time.perf_counter()
    write_data(os.path.join(tmp, "data", "bench"), n_samples, cmp_len, seq_len, vocab)
    print(f"data: {n_samples} windows of {T} tokens in {time.perf_counter() - t0:.1f} s ({tmp})")
    model_keys = ({"model_type": "transformer", "d_model": d, "n_heads": heads, "n_layers": layers, "h_mult": 4,
                   "tie_weights": True} if args.model == "transformer" else
                  {"model_type": "hf", "hf_model": "gpt2",
                   "hf_config": {"n_embd": d, "n_layer": layers, "n_head": heads, "n_positions": T,
                                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}})
    base = Config(data_root=os.path.join(tmp, "data"), dataset="bench", save_root=os.path.join(tmp, "runs"),
                  device=str(device), torch_dtype=dtype, batch_size=batch, n_train_loops=10**6, lr=6e-4,
                  grad_clip=1.0, drop_p=0.0, gen_val_samples=0, n_workers=args.n_workers, seed=0, **model_keys)
    compiles = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    from train.loop import build

    results: dict[str, dict[str, float]] = {}
    print(f"{name}: {args.model} d {d} x {layers} layers, vocab {vocab}, window {T}, batch {batch}, {dtype}, "
          f"{steps} steps after {warmup} warm-up")
    for compiled in compiles:
        for p in (0.0, 0.3):
            cfg = base.replace(blotch_p=p)
            for source in ("shards", "memory"):
                folder = tempfile.mkdtemp(dir=tmp)
                run = build(cfg, folder, None)
                if source == "memory":
                    run.stream = MemoryStream([run.stream.next() for _ in range(8)], device)
                if compiled:
                    run.model = torch.compile(run.model)  # its view and parameters reach the module
                key = f"{source} p={p} {'compiled' if compiled else 'eager'}"
                t0 = time.perf_counter()
                r = measure(run, steps, warmup)
                r["warmup_and_run_s"] = time.perf_counter() - t0
                fpt = flops_per_token(run.model, layers, d, T)
                r["mfu"] = r["tokens_per_s"] * fpt / peak if peak else float("nan")
                if source == "memory":
                    r["blotch_s"] = blotch_seconds(run)
                results[key] = r
                print(f"  {key:28s} {r['step_s'] * 1e3:9.2f} ms/step {r['tokens_per_s']:12.0f} tok/s "
                      f"MFU {100 * r['mfu']:6.2f} %  ({r['tokens_per_step']:.0f} tokens/step)", flush=True)
                del run
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print("ratios")
    best_mfu = max(r["mfu"] for r in results.values())
    print(f"  best MFU                                  {100 * best_mfu:6.2f} %   (target >= 40 %)")
    for compiled in compiles:
        tag = "compiled" if compiled else "eager"
        for p in (0.0, 0.3):
            s, m = results[f"shards p={p} {tag}"], results[f"memory p={p} {tag}"]
            print(f"  pipeline overhead, p={p} {tag:8s}         {100 * (s['step_s'] / m['step_s'] - 1):6.2f} %   "
                  f"(target <= 2 %)")
        m0, m3 = results[f"memory p=0.0 {tag}"], results[f"memory p=0.3 {tag}"]
        print(f"  blotch() / step, p=0.3 {tag:8s}         {100 * m3['blotch_s'] / m3['step_s']:6.2f} %   "
              f"(target <= 3 %)")
        print(f"  step time p=0.3 / p=0, {tag:8s}         {m3['step_s'] / m0['step_s']:6.3f}     "
              f"(tokens/step {m3['tokens_per_step'] / m0['tokens_per_step']:.3f})")
    if len(compiles) == 2:
        for p in (0.0, 0.3):
            e, c = results[f"memory p={p} eager"], results[f"memory p={p} compiled"]
            print(f"  torch.compile speed-up, p={p}               {e['step_s'] / c['step_s']:6.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "model": args.model, "batch": batch, "window": T, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
