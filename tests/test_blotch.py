"""Blotching: the vectorised version against a plain Python reference written from the definition."""
from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train.blotch import IGNORE, P_BITS, BlotchSpec, blotch, hash_u32, words64

PAD, EOS, SEP, SEP2 = 0, 1, 2, 3  # small ids so random rows hit them often


def reference(row: list[int], sid: int, epoch: int, spec: BlotchSpec, train: bool) -> dict:
    """One row, token by token, straight from the definition in train/blotch.py's docstring."""
    L, c = len(row), spec.cmp_len
    valid = [True] * L
    if spec.layout == "padded":
        j = 0
        while j < c and row[j] == spec.pad_id:
            valid[j] = False
            j += 1
        seen_eos = False
        for j in range(c, L):
            if seen_eos:
                valid[j] = False
            seen_eos = seen_eos or row[j] == spec.eos_id
        j = L - 1
        while spec.pad_id != spec.eos_id and j >= c and row[j] == spec.pad_id:
            valid[j] = False
            j -= 1
    seps = [j for j in range(max(c - 1, 0), L) if valid[j] and row[j] in spec.separator_ids]
    n = max(len(seps) - 1, 0)  # segments 1..n lie between consecutive separators
    chosen = set()
    if train and spec.blotch_p > 0:
        p = spec.p_threshold
        if spec.spacing == "random":
            prev = False
            for k in range(1, n + 1):
                hit = hash_u32(*words64(spec.seed), epoch, *words64(sid), 0, k) >> (32 - P_BITS) < p
                if hit and not (prev and not spec.contig):
                    chosen.add(k)
                    prev = True
                else:
                    prev = False
        else:
            m = (n * p + (hash_u32(*words64(spec.seed), epoch, *words64(sid), 1) >> (32 - P_BITS))) >> P_BITS
            if not spec.contig:
                m = min(m, (n + 1) // 2)
            chosen = {1 + ((2 * i + 1) * n) // (2 * m) for i in range(m)}
    blotched = [False] * L
    for k in chosen:
        for j in range(seps[k - 1] + 1, seps[k] + 1):
            blotched[j] = valid[j]
    kept = [j for j in range(L) if valid[j] and not blotched[j]]
    targets = []
    for i, j in enumerate(kept):
        nxt = kept[i + 1] if i + 1 < len(kept) else None
        ok = nxt is not None and (spec.incl_intl_prob or nxt >= c)
        targets.append(row[nxt] if ok else IGNORE)
    positions = list(range(len(kept))) if spec.pad_pos_skip else kept
    return {"ids": [row[j] for j in kept], "targets": targets, "positions": positions, "columns": kept,
            "blotched": blotched, "valid": valid}


def check_against_reference(rows: list[list[int]], sids: list[int], epoch: int, spec: BlotchSpec, train: bool):
    out = blotch(torch.tensor(rows), torch.tensor(sids), epoch, spec, train=train)
    refs = [reference(r, s, epoch, spec, train) for r, s in zip(rows, sids)]
    T = max(1, max(len(r["ids"]) for r in refs))
    assert out.input_ids.shape == (len(rows), T)
    for b, ref in enumerate(refs):
        n = len(ref["ids"])
        assert out.input_ids[b, :n].tolist() == ref["ids"]
        assert out.targets[b, :n].tolist() == ref["targets"]
        assert (out.targets[b, n:] == IGNORE).all()
        assert out.position_ids[b, :n].tolist() == ref["positions"]
        assert out.columns[b, :n].tolist() == ref["columns"]
        assert out.mask[b].tolist() == [i < n for i in range(T)]
        assert out.blotched[b].tolist() == ref["blotched"]
        assert out.valid[b].tolist() == ref["valid"]
    return out, refs


def padded_row(draw, c: int, s: int, vocab: int) -> list[int]:
    """A row in the padded layout: left-padded problem, steps, eos, right padding (possibly none)."""
    n_pad = draw(st.integers(0, c))
    cmp = [PAD] * n_pad + draw(st.lists(st.integers(2, vocab - 1), min_size=c - n_pad, max_size=c - n_pad))
    body = draw(st.lists(st.integers(2, vocab - 1), min_size=0, max_size=s))
    if len(body) < s:
        body = body + [EOS] + [PAD] * (s - len(body) - 1)
    return cmp + body


@st.composite
def batches(draw):
    c = draw(st.integers(0, 5))
    s = draw(st.integers(1, 14))
    vocab = draw(st.integers(4, 8))
    layout = draw(st.sampled_from(["packed", "padded"]))
    B = draw(st.integers(1, 5))
    if layout == "padded" and draw(st.booleans()):
        rows = [padded_row(draw, c, s, vocab) for _ in range(B)]
    else:  # anything at all, including separators at the edges and pad/eos in odd places
        rows = [draw(st.lists(st.integers(0, vocab - 1), min_size=c + s, max_size=c + s)) for _ in range(B)]
    spec = BlotchSpec(
        cmp_len=c, pad_id=PAD, eos_id=draw(st.sampled_from([EOS, PAD])), layout=layout,
        separator_ids=tuple(draw(st.sampled_from([[SEP], [SEP, SEP2]]))),
        blotch_p=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])), spacing=draw(st.sampled_from(["random", "equal"])),
        contig=draw(st.booleans()), incl_intl_prob=draw(st.booleans()), pad_pos_skip=draw(st.booleans()),
        seed=draw(st.integers(0, 2**40)),
    )
    sids = draw(st.lists(st.integers(0, 2**40), min_size=B, max_size=B))
    return rows, sids, draw(st.integers(0, 5)), spec, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(batches())
def test_matches_reference(case):
    check_against_reference(*case)


ARITH = BlotchSpec(cmp_len=6, pad_id=PAD, eos_id=EOS, layout="padded", separator_ids=(SEP,), blotch_p=0.5, seed=3)


def arith_row(n_steps: int, s: int) -> list[int]:
    """`<pad><pad>5 6 7=` then n_steps steps `8 9=`, answer `7`, eos, padding: like 802+203=...=1005<eos>."""
    body = [8, 9, SEP] * n_steps + [7, EOS]
    return [PAD, PAD, 5, 6, 7, SEP] + body + [PAD] * (s - len(body))


def test_edge_rows():
    rows = [
        [SEP] * 16,  # separators everywhere, including both edges
        [PAD] * 6 + [EOS] + [PAD] * 9,  # all padding but the eos
        [PAD, PAD, 5, 6, 7, 8] + [9] * 10,  # no separator
        [PAD, PAD, 5, 6, 7, SEP] + [9] * 9 + [SEP],  # one step, separator at the last column
        arith_row(2, 10),
    ]
    for spec in (ARITH, replace(ARITH, layout="packed", blotch_p=1.0)):
        check_against_reference(rows, [0, 1, 2, 3, 4], 0, spec, True)


def test_problem_and_final_segment_never_blotched():
    rows = [arith_row(4, 16)] * 64
    out = blotch(torch.tensor(rows), torch.arange(64), 0, replace(ARITH, blotch_p=1.0))
    for b in range(64):
        kept = out.input_ids[b][out.mask[b]].tolist()
        assert kept == [5, 6, 7, SEP, 7, EOS]  # every step gone, problem and answer intact
        assert out.targets[b, :6].tolist() == [IGNORE, IGNORE, IGNORE, 7, EOS, IGNORE]


def test_pattern_depends_only_on_seed_epoch_sample():
    rows = torch.tensor([arith_row(5, 16)] * 40)
    sids = torch.arange(100, 140)
    full = blotch(rows, sids, 2, ARITH).blotched
    perm = torch.randperm(40)
    part = blotch(rows[perm[:7]], sids[perm[:7]], 2, ARITH).blotched
    assert torch.equal(part, full[perm[:7]])
    assert not torch.equal(blotch(rows, sids, 3, ARITH).blotched, full)  # a new epoch draws a new pattern
    assert len({tuple(r) for r in full.tolist()}) > 5  # and samples differ from each other


def test_rates_and_spacing():
    n_steps, N = 6, 4000
    rows = torch.tensor([arith_row(n_steps, 24)] * N)
    spec = replace(ARITH, blotch_p=0.3)
    out = blotch(rows, torch.arange(N), 0, spec)
    per_seg = out.blotched[:, 6:6 + 3 * n_steps:3].float()  # first token of each blotchable segment
    assert abs(per_seg.mean().item() - 0.3) < 0.02
    eq = blotch(rows, torch.arange(N), 0, replace(spec, spacing="equal"))
    counts = eq.blotched[:, 6:6 + 3 * n_steps:3].sum(1).float()
    assert set(counts.tolist()) <= {1.0, 2.0} and abs(counts.mean().item() - 0.3 * n_steps) < 0.05
    nc = blotch(rows, torch.arange(N), 0, replace(spec, blotch_p=0.9, contig=False))
    segs = nc.blotched[:, 6:6 + 3 * n_steps:3]
    assert not (segs[:, 1:] & segs[:, :-1]).any() and segs.any()
