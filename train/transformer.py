"""model_type "transformer": the from-scratch pre-LN causal transformer over blotched (excised) windows.

Positions come in explicitly (`position_ids`) because blotching removes tokens: with `pad_pos_skip` a kept
token's position is its rank among kept tokens, otherwise its original column. The attention mask is causal
and hides padded keys, but always lets a query see itself, so a padded row never turns into NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.blotch import Blotched
from train.config import Config


def sinusoid_table(n_pos: int, d: int) -> torch.Tensor:
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n_pos, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table


class PositionalEncoding(nn.Module):
    """A sinusoidal table of `n_pos` rows, fixed (a buffer) or learnable (a Parameter).

    `random_subset` (RandPositionalEncoding): a row of up to `span` tokens reads `span` of the table's rows, in
    order, instead of rows 0..span-1, so the model learns positions as an order rather than as offsets, which
    blotching's gaps then do not disturb. In training each sequence draws a sorted random subset (the global
    RNG, which the seed sets and a resume restores); evaluation reads the subset's expected rows, evenly spread
    over the table, so it is deterministic and reads the rows training used.
    """

    def __init__(self, n_pos: int, d: int, drop_p: float, learnable: bool, random_subset: bool, span: int):
        super().__init__()
        table = sinusoid_table(n_pos, d)
        if learnable:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table)
        self.drop_p, self.random_subset, self.span = drop_p, random_subset, min(span, n_pos)
        # the i-th smallest of `span` rows drawn from n_pos is row (i + 1)(n_pos + 1)/(span + 1) - 1 on average
        i = torch.arange(self.span, dtype=torch.float64)
        self.register_buffer("eval_rows", ((i + 1) * (n_pos + 1) / (self.span + 1) - 1).round().long(),
                             persistent=False)

    def rows(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The table rows that (B, T) positions read."""
        n_pos = self.table.shape[0]
        need = int(position_ids.max()) + 1
        if need > n_pos:
            raise ValueError(f"position {need - 1} needs max_posencs > {n_pos} (config key 'max_posencs')")
        if need > self.span and self.random_subset:
            raise ValueError(f"position {need - 1} is beyond the {self.span} positions of a row")
        if not self.random_subset:
            return position_ids
        if not self.training:
            return self.eval_rows[position_ids]
        scores = torch.rand(position_ids.shape[0], n_pos, device=position_ids.device)
        return scores.topk(self.span, dim=1).indices.sort(dim=1).values.gather(1, position_ids)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.table[self.rows(position_ids)], self.drop_p, self.training)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, h_mult: int, drop_p: float):
        super().__init__()
        self.n_heads, self.drop_p = n_heads, drop_p
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, h_mult * d), nn.GELU(), nn.Linear(h_mult * d, d))
        self.drop = nn.Dropout(drop_p)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache: list[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """`cache` ([] or [keys, values] of earlier tokens) is extended in place: incremental decoding."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                           dropout_p=self.drop_p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_heads: int, h_mult: int, n_layers: int, drop_p: float,
                 posenc: PositionalEncoding, tie_weights: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)  # N(0, 1): the same scale as the position table
        self.posenc = posenc
        self.drop = nn.Dropout(drop_p)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, h_mult, drop_p) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.startswith("blocks") and p.dim() == 2:  # GPT-2 init; residual outputs shrink with depth
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.startswith("blocks") and name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.head.weight, std=0.02)
        self.logit_scale = 1.0
        if tie_weights:  # the N(0, 1) embedding as output weights needs 1/sqrt(d) to start near uniform
            self.head.weight, self.logit_scale = self.embed.weight, d_model**-0.5

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T) ids, positions and key mask (True = a real token) -> (B, T, vocab) logits."""
        return self._run(input_ids, position_ids, mask, None)

    def view(self, v: Blotched) -> Blotched:
        """The blotched batch as this model reads it: as it is."""
        return v

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
               cache: list[list[torch.Tensor]] | None = None) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Incremental decoding: logits of the new tokens given the cache; `mask` covers past and new keys."""
        cache = [[] for _ in self.blocks] if cache is None else cache
        return self._run(input_ids, position_ids, mask, cache), cache

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
             cache: list[list[torch.Tensor]] | None) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache[0][0].shape[2] if cache and cache[0] else 0
        q_idx = torch.arange(past, past + T, device=input_ids.device)
        k_idx = torch.arange(past + T, device=input_ids.device)
        allowed = k_idx[None, :] <= q_idx[:, None]  # causal: query i sees keys j <= i
        if cache is None and (mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all())):
            # real tokens first in every row (what blotching makes): causal attention alone already hides the
            # padding from them, padded positions are never targets, and SDPA can use its fused causal kernels
            allowed = None
        elif mask is not None:
            allowed = allowed & (mask[:, None, :] | (k_idx[None, :] == q_idx[:, None]))  # a query always sees itself
            allowed = allowed[:, None]  # (B, 1, T, past + T), broadcast over heads
        x = self.drop(self.embed(input_ids) + self.posenc(position_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, None if cache is None else cache[i])
        return self.head(self.ln_f(x)) * self.logit_scale


def build(cfg: Config, vocab_size: int, window: int, max_len: int) -> Transformer:
    """The transformer a config describes: `window` (cmp_len + seq_len) sizes the default position table,
    `max_len` is the longest row it reads."""
    n_pos = cfg.max_posencs or 3 * window
    posenc = PositionalEncoding(
        n_pos, cfg.d_model, cfg.drop_p if cfg.posenc_drop_p is None else cfg.posenc_drop_p,
        cfg.learnable_posencs, cfg.posenc_type == "RandPositionalEncoding", max_len,
    )
    return Transformer(vocab_size, cfg.d_model, cfg.n_heads, cfg.h_mult, cfg.n_layers, cfg.drop_p, posenc,
                       cfg.tie_weights)
