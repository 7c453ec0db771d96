"""One pass over validation batches: the teacher-forced loss, free-running decoding and a compressor's baselines.

The loop's validation and `python -m train.eval` both run this pass, so their numbers are the same by
construction. Teacher forcing reads up to `max_batches` unblotched batches; decoding (greedy, KV cache, from each
window's cmp part up to seq_len tokens or eos) scores the first `gen_samples` samples, reading more batches only
when it needs them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from train import scoring
from train.blotch import Blotched, blotch, prompt
from train.data import Source
from train.dist import Context
from train.generate import generate
from train.loss import SUMS, TokenLoss, step_sums, token_loss

Batch = dict[str, torch.Tensor]


@dataclass
class ValPass:
    """One pass over validation batches, summed over the ranks."""
    sums: dict[str, float]  # loss.SUMS of the teacher-forced batches
    record: dict[str, float]  # free-running metrics and a compressor's baselines
    seconds: float  # the pass less decoding and baselines: what a val record's tokens_per_s divides by


def teacher_forced(model: nn.Module, ids: torch.Tensor, sample_ids: torch.Tensor, src: Source, ctx: Context,
                   level: int | None) -> tuple[Blotched, torch.Tensor, TokenLoss]:
    """A batch as the model reads it, its logits and its token loss: unblotched (led by the lowest level's token
    with blotch-intensity levels), or blotched at `level`'s rate and led by its token."""
    v = model.view(blotch(ids, sample_ids, 0, src.spec, train=False, level=level))
    with ctx.autocast():
        logits = model(v.input_ids, v.position_ids, v.mask)
    return v, logits, token_loss(logits, v.targets.to(logits.device))


def free_running_sums(model: nn.Module, ids: torch.Tensor, sample_ids: torch.Tensor, src: Source, ctx: Context,
                      level: int = 0, temperature: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Continuations of a (B, window) batch from its cmp part (led by `level`'s token with intensity levels),
    greedy or sampled (generate.generate), scored against the window's continuation (scoring.GEN_SUMS)."""
    spec = src.spec
    tokens, mask = prompt(ids, spec, level)
    with ctx.autocast():
        gen = generate(model, tokens, mask, src.manifest.seq_len, spec.eos_id, spec.pad_id, spec.pad_pos_skip,
                       temperature, sample_ids, seed)
    return scoring.score(gen, ids, spec, src.has_answers)


def validation_pass(model: nn.Module, batches: Iterable[Batch], src: Source, ctx: Context, *,
                    max_batches: int | None, gen_samples: int, level: int | None = None,
                    on_first: Callable[[Batch, Blotched, torch.Tensor], None] | None = None) -> ValPass:
    """Teacher-forced sums (and a compressor's baselines) on up to `max_batches` batches, and greedy free-running
    metrics on the split's first `gen_samples` samples (by sample id, which is the position in the split's own
    order, so any number of ranks decodes the same ones), summed over the ranks. Windows are unblotched, or with
    intensity levels and a `level` blotched at its rate; decoding asks for `level` (default the lowest).
    `on_first(batch, view, logits)` sees the first batch's teacher-forced output (the loop's examples)."""
    was_training = model.training
    model.eval()
    tf = torch.zeros(len(SUMS), device=ctx.device)
    gen = dict.fromkeys(scoring.GEN_SUMS, 0.0)
    extra: dict[str, float] = {}
    n_tf = max_batches if max_batches is not None else math.inf
    start, aside = time.perf_counter(), 0.0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            sample_ids = batch["sample_id"]
            if i >= n_tf and int(sample_ids.min()) >= gen_samples:
                break
            ids = batch["input_ids"].to(ctx.device)
            if i < n_tf:
                v, logits, out = teacher_forced(model, ids, sample_ids, src, ctx, level)
                tf += step_sums(out, v)
                if i == 0 and on_first is not None:
                    on_first(batch, v, logits)
            t = time.perf_counter()
            if i < n_tf and hasattr(model, "reference_sums"):
                with ctx.autocast():
                    for k, x in model.reference_sums(ids, src.spec).items():
                        extra[k] = extra.get(k, 0.0) + x
            decode = sample_ids < gen_samples
            if decode.any():
                s = free_running_sums(model, ids[decode.to(ids.device)], sample_ids[decode], src, ctx, level or 0)
                gen = {k: gen[k] + s[k] for k in scoring.GEN_SUMS}
            aside += time.perf_counter() - t
    model.train(was_training)
    sums = dict(zip(SUMS, ctx.all_reduce_sum(tf).tolist()))
    seconds = time.perf_counter() - start - aside
    gen_t = ctx.all_reduce_sum(torch.tensor([gen[k] for k in scoring.GEN_SUMS], dtype=torch.float64,
                                            device=ctx.device)).tolist()
    names = sorted(extra)
    extra_t = ctx.all_reduce_sum(torch.tensor([extra[k] for k in names], dtype=torch.float64,
                                              device=ctx.device)).tolist()
    rec: dict[str, float] = {}
    if gen_samples > 0:
        rec.update(scoring.record(dict(zip(scoring.GEN_SUMS, gen_t)), src.has_answers),
                   gen_samples=gen_t[scoring.GEN_SUMS.index("rows")])
    rec.update(reference_record(dict(zip(names, extra_t))))
    return ValPass(sums, rec, seconds)


def reference_record(sums: dict[str, float]) -> dict[str, float]:
    """`<name>_nll`/`_correct`/`_count` sums -> `<name>_loss` and `<name>_acc`."""
    rec = {}
    for name in sorted({k.rsplit("_", 1)[0] for k in sums}):
        count = max(sums[f"{name}_count"], 1.0)
        rec[f"{name}_loss"], rec[f"{name}_acc"] = sums[f"{name}_nll"] / count, sums[f"{name}_correct"] / count
    return rec
