"""Semantic blotching: hide whole reasoning steps of a training window, per sample, on the training device.

A window is `cmp_len + seq_len` token ids. A *segment* is the run of tokens after a separator up to and
including the next separator. Separators count from the last column of the compression part on, so the
initial problem (the compression part and anything up to the first such separator, which it keeps) is never
blotched, and neither is the final segment (after the last separator: the answer and eos). Blotched tokens
are excised, not masked: each row is compacted to the left and the batch trimmed to its longest row, so the
model spends no compute on hidden steps and every kept token's target is simply the next kept token.

The pattern is drawn from a counter-based hash of (seed, epoch, sample_id, segment index), so a sample is
blotched the same way whatever batch, rank or resume it comes in. Everything is integer tensor arithmetic:
no Python loop over rows, segments or tokens, and two host syncs (the most segments in a row, the
trimmed length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
M32 = 0xFFFFFFFF
P_BITS = 16  # blotch_p is applied as an integer threshold out of 2**16, so the Python reference is exact
_GOLDEN = 0x9E3779B9
_STREAM_SEGMENT, _STREAM_COUNT, _STREAM_LEVEL = 0, 1, 2


# xorshift-multiply mixing with odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so
# int64 tensors never overflow (signed overflow is not something to rely on across devices).
_MUL1, _MUL2 = 0x7FEB352D, 0x2C1B3C6D


def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * _MUL1) & M32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & M32
    return h ^ (h >> 16)


def hash_u32(*words, h=_GOLDEN):
    """A 32-bit hash of 32-bit words (Python ints or int64 tensors, broadcast together), chained from `h`.

    Chaining lets a caller hash the per-row prefix once and continue it per segment; it works the same on
    ints and tensors, which is what lets the tests' plain-Python reference match exactly.
    """
    for w in words:
        h = _fmix32(h ^ (w & M32))
    return h


def words64(x):
    """A non-negative 64-bit key (seed, sample id) as its two 32-bit words."""
    return x & M32, (x >> 32) & M32


@dataclass(frozen=True)
class BlotchSpec:
    """What blotching needs to know about the data and the config; built once per run."""

    cmp_len: int
    pad_id: int
    eos_id: int
    layout: str  # "packed" | "padded", as in the manifest
    separator_ids: tuple[int, ...]
    blotch_p: float = 0.0
    spacing: str = "random"  # "random" | "equal"
    contig: bool = True
    incl_intl_prob: bool = False
    pad_pos_skip: bool = True
    seed: int = 0
    # Blotch-intensity tokens: with levels, a window is blotched at its level's rate (not blotch_p) and starts
    # with that level's token, id level_token0 + level. Training draws the level per sample (hashed like the
    # segments); evaluation asks for one (default the lowest), so the model can be asked for shortcuts.
    levels: tuple[float, ...] = ()
    level_token0: int = 0

    @property
    def p_threshold(self) -> int:
        return round(self.blotch_p * (1 << P_BITS))


@dataclass
class Blotched:
    """A batch ready for the model: kept tokens compacted left, targets already aligned."""

    input_ids: torch.Tensor  # (B, T) kept tokens, pad_id after each row's end
    targets: torch.Tensor  # (B, T) the next kept token, IGNORE where there is none or it is excluded
    position_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool, True on kept tokens
    columns: torch.Tensor  # (B, T) the window column each kept token came from, -1 after the row's end
    valid: torch.Tensor  # (B, L) bool, the window's non-padding tokens
    blotched: torch.Tensor  # (B, L) bool, the window's excised tokens


def valid_mask(ids: torch.Tensor, spec: BlotchSpec) -> torch.Tensor:
    """True on real tokens. Padded layout: the cmp part's leading pad run; in the seq part everything after
    the first eos, and (when pad differs from eos) a trailing pad run, e.g. a pair with no eos appended."""
    if spec.layout == "packed":
        return torch.ones_like(ids, dtype=torch.bool)
    c = spec.cmp_len
    cmp_pad = (ids[:, :c] == spec.pad_id).int().cumprod(1).bool()
    seq = ids[:, c:]
    is_eos = (seq == spec.eos_id).int()
    seq_pad = (is_eos.cumsum(1) - is_eos) > 0
    if spec.pad_id != spec.eos_id:
        seq_pad |= (seq == spec.pad_id).int().flip(1).cumprod(1).flip(1).bool()
    return ~torch.cat([cmp_pad, seq_pad], 1)


def rank_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only the real tokens (pad columns repeat their neighbour's), for left-padded rows."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def position_ids(mask: torch.Tensor, columns: torch.Tensor, pad_pos_skip: bool) -> torch.Tensor:
    """The positions every model is trained and decoded with: with `pad_pos_skip` a token's rank among its row's
    real tokens (excised steps and padding leave no gap), otherwise its column in the window."""
    return rank_positions(mask) if pad_pos_skip else columns.clamp(min=0)


def level_tokens(spec: BlotchSpec, levels: torch.Tensor) -> torch.Tensor:
    """(B, 1): the token of each row's blotch-intensity level, which leads the row."""
    return (spec.level_token0 + levels.long())[:, None]


def prompt(ids: torch.Tensor, spec: BlotchSpec, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cmp part of (B, L) windows as generation reads it, and its real-token mask: its left padding stays
    (every row ends with a real token, so one batched call decodes all rows), and with intensity levels it is led
    by `level`'s token, as rows are in training."""
    c = spec.cmp_len
    tokens, mask = ids[:, :c], valid_mask(ids, spec)[:, :c]
    if spec.levels:
        lead = level_tokens(spec, torch.full((len(ids),), level, device=ids.device))
        tokens, mask = torch.cat([lead, tokens], 1), torch.cat([torch.ones_like(lead, dtype=torch.bool), mask], 1)
    return tokens, mask


def segment_index(ids: torch.Tensor, valid: torch.Tensor, spec: BlotchSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the number of eligible separators strictly before it (0 = initial problem); per row, the
    number n of blotchable segments, which are 1..n (segment n+1 is the final one)."""
    seps = torch.tensor(spec.separator_ids, dtype=ids.dtype, device=ids.device)
    is_sep = torch.isin(ids, seps) & valid
    is_sep[:, : max(spec.cmp_len - 1, 0)] = False
    count = is_sep.long().cumsum(1)
    return count - is_sep.long(), (count[:, -1] - 1).clamp(min=0)


def draw_levels(sample_ids: torch.Tensor, epoch: int, spec: BlotchSpec) -> torch.Tensor:
    """(B,) a uniform blotch-intensity level per sample, a function of (seed, epoch, sample_id) only."""
    row = hash_u32(*words64(sample_ids.long()), h=hash_u32(*words64(spec.seed), epoch))
    return hash_u32(_STREAM_LEVEL, h=row) % len(spec.levels)


def choose_segments(n: torch.Tensor, sample_ids: torch.Tensor, epoch: int, spec: BlotchSpec, p: torch.Tensor
                    ) -> torch.Tensor:
    """(B, max(n) + 2) bool: entry k says whether segment k is blotched (only 1 <= k <= n can be); `p` holds
    each row's rate as a threshold out of 2**P_BITS."""
    width = int(n.max()) + 2 if len(n) else 2
    k = torch.arange(width, device=n.device).expand(len(n), width)
    sid = sample_ids.to(device=n.device, dtype=torch.long)[:, None]
    run = hash_u32(*words64(spec.seed), epoch)  # a Python int, continued per row, then per segment
    row = hash_u32(*words64(sid), h=run)  # (B, 1)
    if spec.spacing == "random":
        u = hash_u32(_STREAM_SEGMENT, k, h=row) >> (32 - P_BITS)
        chosen = (u < p[:, None]) & (k >= 1) & (k <= n[:, None])
        if not spec.contig:  # in a run of candidates keep the 1st, 3rd, ...: "skip a segment after a blotch"
            last_gap = torch.where(chosen, -1, k).cummax(1).values
            chosen &= (k - last_gap - 1) % 2 == 0
        return chosen
    # equal spacing: m = stochastic round of p * n, centred at 1 + floor((2i + 1) n / 2m) for i < m
    u = hash_u32(_STREAM_COUNT, h=row[:, 0]) >> (32 - P_BITS)
    m = (n * p + u) >> P_BITS
    if not spec.contig:
        m = torch.minimum(m, (n + 1) // 2)
    pos = 1 + ((2 * k + 1) * n[:, None]) // (2 * m.clamp(min=1)[:, None])
    pos = torch.where(k < m[:, None], pos, width)
    chosen = torch.zeros(len(n), width + 1, dtype=torch.bool, device=n.device)
    return chosen.scatter_(1, pos, True)[:, :width]


def blotch(ids: torch.Tensor, sample_ids: torch.Tensor, epoch: int, spec: BlotchSpec, train: bool = True,
           level: int | None = None) -> Blotched:
    """Excise padding (and, in training, blotched segments) from a (B, L) window batch; see the module doc.

    Training blotches every row (at blotch_p, or at its drawn level's rate with intensity levels). Evaluation
    blotches nothing, unless `level` asks for that intensity level's rate. With levels every row is led by its
    level's token: the drawn one in training, `level` or else the lowest in evaluation."""
    ids = ids.long()
    B, L = ids.shape
    valid = valid_mask(ids, spec)
    p = torch.full((B,), spec.p_threshold, device=ids.device)
    if spec.levels:
        levels = draw_levels(sample_ids.to(ids.device), epoch, spec) if train else torch.full_like(p, level or 0)
        p = torch.tensor([round(x * (1 << P_BITS)) for x in spec.levels], device=ids.device)[levels]
    if (spec.levels or spec.blotch_p > 0) if train else (level is not None and bool(spec.levels)):
        seg, n = segment_index(ids, valid, spec)
        chosen = choose_segments(n, sample_ids, epoch, spec, p)
        blotched = chosen.gather(1, seg) & valid
    else:
        blotched = torch.zeros_like(valid)
    keep = valid & ~blotched
    n_kept = keep.sum(1)
    T = max(int(n_kept.max()), 1) if B else 1
    dest = torch.where(keep, keep.long().cumsum(1) - 1, L)  # non-kept tokens all land in a dropped column
    cols = torch.arange(L, device=ids.device).expand(B, L)
    input_ids = ids.new_full((B, L + 1), spec.pad_id).scatter_(1, dest, ids)[:, :T]
    columns = ids.new_full((B, L + 1), -1).scatter_(1, dest, cols)[:, :T]
    mask = torch.arange(T, device=ids.device) < n_kept[:, None]
    targets = torch.full_like(input_ids, IGNORE)
    counted = mask[:, 1:]
    if not spec.incl_intl_prob:
        counted = counted & (columns[:, 1:] >= spec.cmp_len)
    targets[:, :-1] = torch.where(counted, input_ids[:, 1:], IGNORE)
    v = Blotched(input_ids, targets, position_ids(mask, columns, spec.pad_pos_skip), mask, columns, valid, blotched)
    return prepend(v, level_tokens(spec, levels)) if spec.levels else v


def prepend(v: Blotched, prefix: torch.Tensor) -> Blotched:
    """`prefix` (B, k) tokens put before every row: inputs only (never targets), at positions 0..k-1."""
    B, k = prefix.shape
    lead = torch.arange(k, device=prefix.device).expand(B, k)
    return Blotched(torch.cat([prefix, v.input_ids], 1), torch.cat([torch.full_like(prefix, IGNORE), v.targets], 1),
                    torch.cat([lead, v.position_ids + k], 1), torch.cat([torch.ones_like(prefix, dtype=torch.bool), v.mask], 1),
                    torch.cat([torch.full_like(prefix, -1), v.columns], 1), v.valid, v.blotched)
