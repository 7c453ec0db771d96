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

GEN_SUMS = ("gen_correct", "gen_count", "rows", "answer_correct", "answer_rows", "gen_steps", "ref_steps",
            "gen_tokens", "ref_tokens", "no_eos")


def final_answer(tokens: list[int], seps: set[int], eos: int) -> tuple[int, ...] | None:
    """The tokens after the last separator up to eos; None when there is no eos (unfinished or cut short)."""
    if eos not in tokens:
        return None
    body = tokens[: tokens.index(eos)]
    last = max((i for i, t in enumerate(body) if t in seps), default=-1)
    return tuple(body[last + 1:])


def body(tokens: list[int], eos: int) -> list[int]:
    """A solution without its eos and what follows; all of it when it never ended."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def n_steps(tokens: list[int], seps: set[int], eos: int) -> int:
    """Solution steps: separator-ended segments before eos, plus the final answer's."""
    return sum(t in seps for t in body(tokens, eos)) + 1


def real_tokens(ids: torch.Tensor, spec: BlotchSpec, part: slice) -> list[list[int]]:
    """Each row's real tokens in `part` of the window (slice(None, cmp_len): the problem; after it: the
    reference continuation)."""
    rows, valid = ids[:, part].tolist(), valid_mask(ids, spec)[:, part].tolist()
    return [[t for t, ok in zip(row, v) if ok] for row, v in zip(rows, valid)]


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
        for g, r in zip(gen.tolist(), real_tokens(ids, spec, slice(c, None))):
            want = final_answer(r, seps, spec.eos_id)
            if want is not None:
                sums["answer_rows"] += 1
                sums["answer_correct"] += float(final_answer(g, seps, spec.eos_id) == want)
            sums["gen_steps"] += n_steps(g, seps, spec.eos_id)
            sums["ref_steps"] += n_steps(r, seps, spec.eos_id)
            sums["gen_tokens"] += len(body(g, spec.eos_id))
            sums["ref_tokens"] += len(body(r, spec.eos_id))
            sums["no_eos"] += spec.eos_id not in g
    return sums


def record(sums: dict[str, float], has_answers: bool) -> dict[str, float]:
    """The means of GEN_SUMS: gen_acc (token accuracy against the reference), and with answers answer_acc,
    gen_steps/ref_steps and gen_tokens/ref_tokens (solution lengths, eos excluded), len_diff_pct (the paper's
    "Len Diff %": generated tokens relative to the reference's, over all rows) and no_eos (the share of rows that
    never ended within seq_len tokens)."""
    rec = {"gen_acc": sums["gen_correct"] / max(sums["gen_count"], 1.0)}
    if has_answers:
        rows = max(sums["rows"], 1.0)
        rec.update(answer_acc=sums["answer_correct"] / max(sums["answer_rows"], 1.0),
                   gen_steps=sums["gen_steps"] / rows, ref_steps=sums["ref_steps"] / rows,
                   gen_tokens=sums["gen_tokens"] / rows, ref_tokens=sums["ref_tokens"] / rows,
                   len_diff_pct=100.0 * (sums["gen_tokens"] / max(sums["ref_tokens"], 1.0) - 1.0),
                   no_eos=sums["no_eos"] / rows)
    return rec
