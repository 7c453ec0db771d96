"""`python -m train.eval SAVE_FOLDER [--temperature T ...] [--blotch_level X ... | all]`: evaluate a checkpoint.

First the loop's validation pass (validation.validation_pass): the teacher-forced loss and accuracy on
unblotched windows. Then the first `--gen_samples` windows of the split are decoded from their cmp part at every
asked blotch-intensity level and temperature (0 = greedy; sampling is seeded, see generate.py) and scored:
answer accuracy, solution length in tokens and steps against the reference (the paper's "Len Diff %"), and the
share that never reached eos. The report is printed as a table and written as `eval_<split>_step<N>.json`
next to the checkpoints. With model_parallel the model is built on the CPU, loaded, then spread over the GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from shards import ManifestError, storage
from train import checkpoint, scoring
from train.blotch import BlotchSpec
from train.build import load_model
from train.config import ConfigError, resume_config
from train.data import Source, eval_loader, open_source, rng_neutral
from train.dist import Context, setup
from train.loss import token_means
from train.validation import free_running_sums, validation_pass

TABLE_KEYS = ("answer_acc", "len_diff_pct", "gen_steps", "ref_steps", "gen_tokens", "no_eos", "gen_acc")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("save_folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--checkpoint", help="a checkpoint file (default: the folder's latest)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0], help="sampling temperatures; 0 = greedy")
    ap.add_argument("--blotch_level", nargs="+", default=None,
                    help="blotch-intensity rates to ask for, or 'all' (default: the lowest)")
    ap.add_argument("--gen_samples", type=int, help="windows decoded (default: the config's gen_val_samples)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    ap.add_argument("--max_batches", type=int, help="teacher-forced batches (default: the config's max_val_loops)")
    ap.add_argument("--batch_size", type=int, help="windows decoded together (default: the config's val batch size)")
    ap.add_argument("--device", help="torch device (default: the config's)")
    return ap.parse_args(argv)


def level_indices(spec: BlotchSpec, asked: list[str] | None) -> list[int | None]:
    """The intensity levels asked for (`all`, or rates that must be among the run's levels); [None] (the lowest,
    unblotched teacher forcing) when none is asked."""
    if asked is None:
        return [None]
    if not spec.levels:
        raise ConfigError("--blotch_level: the run was not trained with blotch_tokens")
    if asked == ["all"]:
        return list(range(len(spec.levels)))
    out = []
    for text in asked:
        try:
            rate = float(text)
        except ValueError:
            raise ConfigError(f"--blotch_level: {text!r} is neither a rate nor 'all'") from None
        match = [i for i, x in enumerate(spec.levels) if abs(x - rate) < 1e-6]
        if not match:
            raise ConfigError(f"--blotch_level: {rate} is not one of the run's levels "
                              f"{[round(x, 6) for x in spec.levels]}")
        out.append(match[0])
    return out


def first_windows(src: Source, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's first `n` windows in order, and their sample ids."""
    ids, sids, have = [], [], 0
    for batch in rng_neutral(eval_loader(src, split, 0, 1)):
        ids.append(batch["input_ids"])
        sids.append(batch["sample_id"])
        have += len(batch["input_ids"])
        if have >= n:
            break
    return torch.cat(ids)[:n], torch.cat(sids)[:n]


def decode_grid(model: nn.Module, ids: torch.Tensor, sample_ids: torch.Tensor, src: Source, ctx: Context,
                levels: list[int | None], temperatures: list[float], seed: int, batch_size: int
                ) -> list[dict[str, Any]]:
    """One scored record per (level, temperature), every one on the same windows and the same sampling noise."""
    model.eval()
    chunks = [(ids[i:i + batch_size].to(ctx.device), sample_ids[i:i + batch_size])
              for i in range(0, len(ids), batch_size)]
    bar = tqdm(total=len(levels) * len(temperatures) * len(ids), unit="sample", desc="decoding", dynamic_ncols=True)
    rows = []
    for level in levels:
        for t in temperatures:
            sums = dict.fromkeys(scoring.GEN_SUMS, 0.0)
            for chunk, sids in chunks:
                s = free_running_sums(model, chunk, sids, src, ctx, level or 0, t, seed)
                sums = {k: sums[k] + s[k] for k in scoring.GEN_SUMS}
                bar.update(len(chunk))
            rate = None if level is None else src.spec.levels[level]
            rows.append({"blotch_level": rate, "temperature": t, "samples": int(sums["rows"]),
                         **scoring.record(sums, src.has_answers)})
    bar.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in TABLE_KEYS if k in rows[0]]
    lines = ["| blotch_level | temperature | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        level = "-" if r["blotch_level"] is None else f"{r['blotch_level']:.2f}"
        lines.append(f"| {level} | {r['temperature']:g} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        src = open_source(resume_config(args.save_folder, {"device": args.device} if args.device else {}),
                          [args.split])
        state = checkpoint.load(args.checkpoint or args.save_folder)
        levels = level_indices(src.spec, args.blotch_level)
        if any(t < 0 for t in args.temperature):
            raise ConfigError(f"--temperature: {args.temperature} must all be >= 0")
    except (ConfigError, ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, m = src.cfg, src.manifest
    ctx = setup(cfg.replace(multi_gpu=False))
    model = load_model(cfg, m.vocab_size, m.window, state["model"], ctx.device)
    tf = validation_pass(model, rng_neutral(eval_loader(src, args.split, 0, 1)), src, ctx,
                         max_batches=args.max_batches or cfg.max_val_loops, gen_samples=0)
    n = cfg.gen_val_samples if args.gen_samples is None else args.gen_samples
    ids, sample_ids = first_windows(src, args.split, n)
    rows = decode_grid(model, ids, sample_ids, src, ctx, levels, args.temperature, args.seed,
                       args.batch_size or cfg.val_batch_size or cfg.batch_size)
    step = state["progress"]["step"]
    report = {"save_folder": args.save_folder, "step": step, "split": args.split, "dataset": src.url,
              "seed": args.seed, "gen_samples": len(ids), **token_means(tf.sums), "tokens": tf.sums["count"],
              **tf.record, "results": rows}
    path = os.path.join(args.save_folder, f"eval_{args.split}_step{step}.json")
    storage.write_local_atomic(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"{args.save_folder} step {step}, {args.split}: teacher-forced loss {report['loss']:.4f} acc "
          f"{report['acc']:.4f}; {len(ids)} windows decoded")
    print(table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
