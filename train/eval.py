"""Evaluation beyond teacher forcing: greedy free-running decoding from the initial problem, and its report.

Teacher-forced accuracy says little about whether a model solves a problem: a single wrong step derails
everything after it. So validation also decodes greedily (KV cache) from each window's cmp part, up to seq_len
tokens or eos, and compares with the window's continuation: token accuracy for any data, and for padded
one-problem-per-window data (arithmetic) the final-answer accuracy and the mean number of solution steps
(separator-ended segments + the answer), generated and in the reference. Fewer generated steps at equal answer
accuracy is what blotching is for.

`python -m train.eval SAVE_FOLDER [--split val] [--blotch_level X]` evaluates a run's latest checkpoint and
writes `eval_<split>[_level<X>]_step<N>.json` next to it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from train.blotch import Blotched, BlotchSpec, blotch, valid_mask
from train.config import Config, ConfigError
from train.generate import greedy
from train.loss import SUMS, TokenLoss, step_sums, token_loss
from train.model import build_model, model_view

GEN_SUMS = ("gen_correct", "gen_count", "rows", "answer_correct", "answer_rows", "gen_steps", "ref_steps")


def final_answer(tokens: list[int], seps: set[int], eos: int) -> tuple[int, ...] | None:
    """The tokens after the last separator up to eos; None when there is no eos (unfinished or cut short)."""
    if eos not in tokens:
        return None
    body = tokens[: tokens.index(eos)]
    last = max((i for i, t in enumerate(body) if t in seps), default=-1)
    return tuple(body[last + 1:])


def n_steps(tokens: list[int], seps: set[int], eos: int) -> int:
    """Solution steps: separator-ended segments before eos, plus the final answer's."""
    body = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return sum(t in seps for t in body) + 1


def free_running_sums(model: nn.Module, ids: torch.Tensor, spec: BlotchSpec, seq_len: int, per_problem: bool,
                      level: int = 0) -> dict[str, float]:
    """Greedy continuations of a (B, window) batch from its cmp part, scored against the window's continuation
    (unblotched: with a shortcut level, fewer steps to the same answer is the point).

    With blotch-intensity levels the prompt starts with the token of `level`."""
    c = spec.cmp_len
    valid = valid_mask(ids, spec)
    prompt, pmask = ids[:, :c], valid[:, :c]
    if spec.levels:  # the token leads the window in training too (its padding, if any, then follows it)
        prompt = torch.cat([prompt.new_full((len(ids), 1), spec.level_token0 + level), prompt], 1)
        pmask = torch.cat([torch.ones_like(pmask[:, :1]), pmask], 1)
    gen = greedy(model, prompt, pmask, seq_len, spec.eos_id, spec.pad_id, spec.pad_pos_skip)
    ref, rmask = ids[:, c:], valid[:, c:]
    sums = dict.fromkeys(GEN_SUMS, 0.0)
    sums["gen_correct"] = float(((gen == ref) & rmask).sum())
    sums["gen_count"] = float(rmask.sum())
    sums["rows"] = float(len(ids))
    if per_problem:
        seps = set(spec.separator_ids)
        for g, r, m in zip(gen.tolist(), ref.tolist(), rmask.tolist()):
            r = [t for t, keep in zip(r, m) if keep]
            want = final_answer(r, seps, spec.eos_id)
            if want is not None:
                sums["answer_rows"] += 1
                sums["answer_correct"] += float(final_answer(g, seps, spec.eos_id) == want)
            sums["gen_steps"] += n_steps(g, seps, spec.eos_id)
            sums["ref_steps"] += n_steps(r, seps, spec.eos_id)
    return sums


def free_running_record(sums: dict[str, float], per_problem: bool) -> dict[str, float]:
    rec = {"gen_acc": sums["gen_correct"] / max(sums["gen_count"], 1.0)}
    if per_problem:
        rows = max(sums["rows"], 1.0)
        rec.update(answer_acc=sums["answer_correct"] / max(sums["answer_rows"], 1.0),
                   gen_steps=sums["gen_steps"] / rows, ref_steps=sums["ref_steps"] / rows)
    return rec


def per_problem(layout: str) -> bool:
    """Padded windows hold one eos-ended problem and solution each; packed text has no final answer."""
    return layout == "padded"


def teacher_forced(model: nn.Module, ids: torch.Tensor, sample_ids: torch.Tensor, spec: BlotchSpec,
                   autocast: Callable[[], ContextManager], level: int) -> tuple[Blotched, torch.Tensor, TokenLoss]:
    """An unblotched batch as the model reads it (led by `level`'s token with blotch-intensity levels), its
    logits and its token loss."""
    v = model_view(model, blotch(ids, sample_ids, 0, spec, train=False, level=level))
    with autocast():
        logits = model(v.input_ids, v.position_ids, v.mask)
    return v, logits, token_loss(logits, v.targets.to(logits.device))


@dataclass
class ValPass:
    """One pass over validation batches, summed over the ranks."""
    sums: dict[str, float]  # loss.SUMS of the teacher-forced batches
    record: dict[str, float]  # free-running metrics and a compressor's baselines
    seconds: float  # the pass less decoding and baselines: what a val record's tokens_per_s divides by


def validation_pass(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], spec: BlotchSpec, seq_len: int,
                    layout: str, device: torch.device, autocast: Callable[[], ContextManager],
                    max_batches: int | None, gen_samples: int,
                    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, level: int = 0,
                    first: Callable[[dict[str, torch.Tensor], Blotched, torch.Tensor], None] | None = None
                    ) -> ValPass:
    """Teacher-forced sums (and a compressor's baselines) on up to `max_batches` unblotched batches, and
    free-running metrics on the first `gen_samples` samples, in one pass (it reads more batches only when
    decoding needs them); `reduce` sums tensors over ranks. With blotch-intensity levels, windows are blotched at
    `level`'s rate and led by its token. `first(batch, view, logits)` sees the first batch's teacher-forced
    output (the loop's examples)."""
    was_training = model.training
    model.eval()
    tf = torch.zeros(len(SUMS), device=device)
    gen = dict.fromkeys(GEN_SUMS, 0.0)
    extra: dict[str, float] = {}
    n_tf = max_batches if max_batches is not None else math.inf
    start, aside = time.perf_counter(), 0.0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if i >= n_tf and gen["rows"] >= gen_samples:
                break
            ids = batch["input_ids"].to(device)
            if i < n_tf:
                v, logits, out = teacher_forced(model, ids, batch["sample_id"], spec, autocast, level)
                tf += step_sums(out, v)
                if i == 0 and first is not None:
                    first(batch, v, logits)
            t = time.perf_counter()
            if i < n_tf and hasattr(model, "reference_sums"):
                with autocast():
                    for k, x in model.reference_sums(ids, spec).items():
                        extra[k] = extra.get(k, 0.0) + x
            take = gen_samples - int(gen["rows"])
            if take > 0:
                with autocast():
                    s = free_running_sums(model, ids[:take], spec, seq_len, per_problem(layout), level)
                gen = {k: gen[k] + s[k] for k in GEN_SUMS}
            aside += time.perf_counter() - t
    model.train(was_training)
    sums = dict(zip(SUMS, reduce(tf).tolist()))
    seconds = time.perf_counter() - start - aside
    gen_t = reduce(torch.tensor([gen[k] for k in GEN_SUMS], dtype=torch.float64, device=device)).tolist()
    names = sorted(extra)
    extra_t = reduce(torch.tensor([extra[k] for k in names], dtype=torch.float64, device=device)).tolist()
    rec: dict[str, float] = {}
    if gen_samples > 0:
        rec.update(free_running_record(dict(zip(GEN_SUMS, gen_t)), per_problem(layout)), gen_samples=gen_t[2])
    rec.update(reference_record(dict(zip(names, extra_t))))
    return ValPass(sums, rec, seconds)


def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], spec: BlotchSpec, seq_len: int,
             layout: str, device: torch.device, autocast: Callable[[], ContextManager], max_batches: int | None,
             gen_samples: int, level: int = 0) -> dict[str, float]:
    """`python -m train.eval`'s record: teacher-forced loss/acc/ppl and target count, then the free-running
    metrics and a compressor's baselines (see validation_pass)."""
    val = validation_pass(model, batches, spec, seq_len, layout, device, autocast, max_batches, gen_samples,
                          level=level)
    count = max(val.sums["count"], 1.0)
    loss = val.sums["nll"] / count
    return {"loss": loss, "acc": val.sums["correct"] / count, "ppl": math.exp(min(loss, 50.0)),
            "tokens": val.sums["count"], **val.record}


def reference_record(sums: dict[str, float]) -> dict[str, float]:
    """`<name>_nll`/`_correct`/`_count` sums -> `<name>_loss` and `<name>_acc`."""
    rec = {}
    for name in sorted({k.rsplit("_", 1)[0] for k in sums}):
        count = max(sums[f"{name}_count"], 1.0)
        rec[f"{name}_loss"], rec[f"{name}_acc"] = sums[f"{name}_nll"] / count, sums[f"{name}_correct"] / count
    return rec


def describe(rec: dict[str, Any]) -> str:
    """The free-running part of a val record as one log line ('' when there is none)."""
    keys = [k for k in ("gen_acc", "answer_acc", "gen_steps", "ref_steps") if k in rec]
    keys += sorted(k for k in rec if k.endswith(("ctx_loss", "ctx_acc")))
    return ", ".join(f"{k} {rec[k]:.4f}" for k in keys)


def autocast_for(cfg: Config, device: torch.device) -> Callable[[], ContextManager]:
    dtype = getattr(torch, cfg.torch_dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description="Evaluate a run's latest checkpoint.")
    ap.add_argument("save_folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--checkpoint", help="a checkpoint file (default: the folder's latest)")
    ap.add_argument("--blotch_level", type=float, help="with blotch_tokens: the blotch rate to ask for")
    ap.add_argument("--max_batches", type=int, help="teacher-forced batches (default: the config's max_val_loops)")
    ap.add_argument("--gen_samples", type=int, help="samples decoded greedily (default: the config's gen_val_samples)")
    ap.add_argument("--device", help="torch device (default: the config's)")
    args = ap.parse_args(argv)
    from shards import ManifestError
    from train import checkpoint
    from train.__main__ import resume_config
    from train.data import eval_loader, open_source, rng_neutral

    try:
        src = open_source(resume_config(args.save_folder, {"device": args.device} if args.device else {}),
                          [args.split])
        state = checkpoint.load(args.checkpoint or args.save_folder)
        level = level_index(src.spec, args.blotch_level)
        batches = eval_loader(src, args.split, 0, 1)
    except (ConfigError, ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, m = src.cfg, src.manifest
    from train.dist import setup

    device = setup(cfg.replace(multi_gpu=False)).device
    if cfg.model_parallel:  # load the weights first: a sharded model may have offloaded layers
        from train.parallel import shard_loaded

        model = build_model(cfg.replace(model_parallel=False, max_memory=None), m.vocab_size, m.window)
        model.load_state_dict(state["model"])
        model = shard_loaded(model, cfg)
    else:
        model = build_model(cfg, m.vocab_size, m.window).to(device)
        model.load_state_dict(state["model"])
    rec = evaluate(model, rng_neutral(batches), src.spec, m.seq_len, m.layout, device, autocast_for(cfg, device),
                   args.max_batches or cfg.max_val_loops,
                   cfg.gen_val_samples if args.gen_samples is None else args.gen_samples, level=level)
    step = state["progress"]["step"]
    report = {"save_folder": args.save_folder, "step": step, "split": args.split, "dataset": src.url,
              "blotch_level": args.blotch_level, **rec}
    level = "" if args.blotch_level is None else f"_level{args.blotch_level:g}"
    path = os.path.join(args.save_folder, f"eval_{args.split}{level}_step{step}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


def level_index(spec: BlotchSpec, rate: float | None) -> int:
    """The blotch-intensity level asking for `rate` (default: the lowest)."""
    if rate is None:
        return 0
    if not spec.levels:
        raise ConfigError("--blotch_level: the run was not trained with blotch_tokens")
    for i, x in enumerate(spec.levels):
        if abs(x - rate) < 1e-6:
            return i
    raise ConfigError(f"--blotch_level: {rate} is not one of the run's levels {[round(x, 6) for x in spec.levels]}")


if __name__ == "__main__":
    sys.exit(main())
