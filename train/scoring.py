"""Scoring generated continuations against the data's own: final answers, solution steps, token accuracy.

Teacher-forced accuracy says little about whether a model solves a problem: a single wrong step derails
everything after it. So generated continuations are compared with the window's continuation: token accuracy for
any data, and where each window holds one problem and its worked solution (data with answers, such as
arithmetic) the final-answer accuracy and the number of solution steps (separator-ended segments + the answer),
generated and in the reference. Fewer generated steps at equal answer accuracy is what blotching is for.
Everything here sums, so batches and ranks add up before any mean is taken.
"""
from __future__ import annotations

import torch

from train.blotch import BlotchSpec, valid_mask

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


def score(gen: torch.Tensor, ids: torch.Tensor, spec: BlotchSpec, has_answers: bool) -> dict[str, float]:
    """GEN_SUMS of (B, seq_len) generated continuations against the (B, window) windows they continue (unblotched:
    with a shortcut level, fewer steps to the same answer is the point)."""
    c = spec.cmp_len
    ref, rmask = ids[:, c:], valid_mask(ids, spec)[:, c:]
    sums = dict.fromkeys(GEN_SUMS, 0.0)
    sums["gen_correct"] = float(((gen == ref) & rmask).sum())
    sums["gen_count"] = float(rmask.sum())
    sums["rows"] = float(len(ids))
    if has_answers:
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


def record(sums: dict[str, float], has_answers: bool) -> dict[str, float]:
    """The means of GEN_SUMS: gen_acc, and with answers answer_acc, gen_steps and ref_steps."""
    rec = {"gen_acc": sums["gen_correct"] / max(sums["gen_count"], 1.0)}
    if has_answers:
        rows = max(sums["rows"], 1.0)
        rec.update(answer_acc=sums["answer_correct"] / max(sums["answer_rows"], 1.0),
                   gen_steps=sums["gen_steps"] / rows, ref_steps=sums["ref_steps"] / rows)
    return rec
