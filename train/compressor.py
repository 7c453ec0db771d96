"""model_type "compressor": context compression with a Hugging Face causal LM (the original's SentenceAutoEncoder).

`n_cmps` learned vectors are appended after the cmp part's tokens; the LM's hidden states at those positions in
layer `cmp_layer` (optionally projected) are the compressed context. The same LM then predicts the continuation
from `[compressed; SOS; continuation]` and, with `rmb_task`, reconstructs the cmp tokens from
`[compressed; RMB; cmp tokens]`. Unlike the original, the appended vectors are attended (it masked them as
padding, bug B22), and positions are explicit, so blotched continuations keep their gaps.

The loop's blotched batch is reorganised by `view`: the cmp tokens (compacted, right-padded to cmp_len) then
the continuation, each position's target being its own token (the decoders' outputs are already shifted: the
output at SOS predicts the first continuation token). Everything not trained (the cmp part without `rmb_task`,
the continuation with `rmb_only`) is IGNORE, so the loop's loss is exactly this model's objective.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from train.blotch import IGNORE, Blotched, BlotchSpec, blotch, rank_positions, valid_mask
from train.config import Config, ConfigError
from train.hf_model import cache_kwarg
from train.loss import token_loss


def layer_index(cmp_layer: int | str, n_layers: int) -> int:
    """An index into `hidden_states` (n_layers + 1 entries: the embeddings, then each layer's output)."""
    if cmp_layer == "half":
        return n_layers // 2
    if cmp_layer == "last":
        return n_layers
    if not -(n_layers + 1) <= cmp_layer <= n_layers:
        raise ConfigError(f"config key 'cmp_layer': {cmp_layer} is outside the hidden states 0..{n_layers} (or "
                          f"-{n_layers + 1}..-1)")
    return cmp_layer % (n_layers + 1)


def check(cfg: Config) -> None:
    """Before the base LM is loaded: a compressor needs a cmp part to compress."""
    if cfg.cmp_len is None or cfg.cmp_len < 1:
        raise ConfigError(f"config key 'cmp_len': model_type compressor needs a cmp part, got {cfg.cmp_len}")


def extra_tokens(cfg: Config) -> int:
    """Rows are the window plus the compression vectors and the task token (SOS or RMB)."""
    return cfg.n_cmps + 1


def _shift_left(t: torch.Tensor, start: torch.Tensor, n: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """Per row, `t[start:start + n]` in columns 0..n-1 of a (B, width) tensor, `fill` after."""
    cols = torch.arange(width, device=t.device)
    idx = (start[:, None] + cols).clamp(max=t.shape[1] - 1)
    return torch.where(cols < n[:, None], t.gather(1, idx), fill)


class Compressor(nn.Module):
    def __init__(self, cfg: Config, base: nn.Module):
        """`base`: the transformers causal LM (hf_model.load_causal_lm), frozen unless train_base."""
        super().__init__()
        self.base = base
        self.base.requires_grad_(cfg.train_base)
        self.cmp_len, self.n_cmps, self.pad_pos_skip = cfg.cmp_len, cfg.n_cmps, cfg.pad_pos_skip
        self.rmb, self.cont = cfg.rmb_task or cfg.rmb_only, not cfg.rmb_only
        self.layer = layer_index(cfg.cmp_layer, self.base.config.num_hidden_layers)
        emb = self.base.get_input_embeddings().weight
        H = emb.shape[1]
        # CMP vectors, then SOS and RMB: drawn at the scale of the token embeddings they sit among
        self.embs = nn.Parameter(torch.randn(cfg.n_cmps + 2, H, device=emb.device) * float(emb.detach().std()))
        self.sos, self.rmb_id = cfg.n_cmps, cfg.n_cmps + 1
        self.proj: nn.Module | None = None
        if cfg.proj_cmpr:
            self.proj = (nn.Linear(H, H) if not cfg.proj_hid_mult else
                         nn.Sequential(nn.Linear(H, cfg.proj_hid_mult * H), nn.ReLU(), nn.Linear(cfg.proj_hid_mult * H, H)))
            self.proj.to(emb.device)
        self._cache_kw = cache_kwarg(self.base)

    @property
    def lm(self) -> nn.Module:
        """The transformers model: what model_parallel spreads over the devices."""
        return self.base

    def _lm(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, **kw: Any):
        return self.base(inputs_embeds=x, attention_mask=mask.long(), position_ids=positions, **kw)

    def compress(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C) tokens and mask -> (B, n_cmps, H) compressed context."""
        B = len(ids)
        x = torch.cat([self.base.get_input_embeddings()(ids), self.embs[: self.n_cmps].expand(B, -1, -1)], 1)
        full = torch.cat([mask, mask.new_ones(B, self.n_cmps)], 1)
        n = mask.long().sum(1, keepdim=True)
        positions = torch.cat([rank_positions(mask), n + torch.arange(self.n_cmps, device=ids.device)], 1)
        h = self._lm(x, full, positions, output_hidden_states=True, use_cache=False).hidden_states[self.layer]
        h = h[:, -self.n_cmps:].to(self.embs.device)
        return h if self.proj is None else self.proj(h)

    def _decode_task(self, cmpr: torch.Tensor, task: int, ids: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V): entry j predicts ids[:, j] from [compressed; task token; ids[:, :j]]."""
        B, L = ids.shape
        k = self.n_cmps + 1
        x = torch.cat([cmpr, self.embs[task].expand(B, 1, -1), self.base.get_input_embeddings()(ids)], 1)
        full = torch.cat([mask.new_ones(B, k), mask], 1)
        pos = torch.cat([torch.arange(k, device=ids.device).expand(B, k), k + positions], 1)
        return self._lm(x, full, pos, use_cache=False).logits[:, self.n_cmps: self.n_cmps + L]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A `view`-layout batch -> (B, cmp_len + S, vocab) logits aligned with the view's targets."""
        C = self.cmp_len
        cmp_ids, cmp_mask = input_ids[:, :C], mask[:, :C]
        cmpr = self.compress(cmp_ids, cmp_mask)
        V = self.base.config.vocab_size
        parts = []
        for on, task, sl in ((self.rmb, self.rmb_id, slice(None, C)), (self.cont, self.sos, slice(C, None))):
            ids = input_ids[:, sl]
            if on:
                parts.append(self._decode_task(cmpr, task, ids, mask[:, sl], position_ids[:, sl]))
            else:  # not trained: its targets are all IGNORE
                parts.append(cmpr.new_zeros(*ids.shape, V))
        return torch.cat([p.to(parts[-1].device) for p in parts], 1)

    def view(self, v: Blotched) -> Blotched:
        """The loop's blotched batch in this model's layout: cmp tokens compacted into the first cmp_len columns,
        then the continuation; each target is the position's own token, where trained (see the module doc)."""
        C = self.cmp_len
        n_c = (v.mask & (v.columns >= 0) & (v.columns < C)).sum(1)  # a compacted row: its cmp tokens come first
        n_s = (v.mask & (v.columns >= C)).sum(1)
        S = max(int(n_s.max()), 1)
        start = torch.zeros_like(n_c)
        cmp_ids, cmp_cols = _shift_left(v.input_ids, start, n_c, C, 0), _shift_left(v.columns, start, n_c, C, -1)
        cont_ids, cont_cols = _shift_left(v.input_ids, n_c, n_s, S, 0), _shift_left(v.columns, n_c, n_s, S, -1)
        cmp_mask = torch.arange(C, device=n_c.device) < n_c[:, None]
        cont_mask = torch.arange(S, device=n_c.device) < n_s[:, None]
        cont_pos = _shift_left(v.position_ids, n_c, n_s, S, 0) - (n_c[:, None] if self.pad_pos_skip else C)
        targets = torch.cat([torch.where(cmp_mask & self.rmb, cmp_ids, IGNORE),
                             torch.where(cont_mask & self.cont, cont_ids, IGNORE)], 1)
        return Blotched(torch.cat([cmp_ids, cont_ids], 1), targets,
                        torch.cat([rank_positions(cmp_mask), torch.where(cont_mask, cont_pos, 0)], 1),
                        torch.cat([cmp_mask, cont_mask], 1), torch.cat([cmp_cols, cont_cols], 1), v.valid, v.blotched)

    @torch.no_grad()
    def reference_sums(self, ids: torch.Tensor, spec: BlotchSpec) -> dict[str, float]:
        """This model on the continuation alone (`cmp_ctx`, without the reconstruction that `loss` may include)
        next to the original's two reference points from the base LM: the continuation alone (`no_ctx`; its
        first token has nothing to be predicted from and is not counted) and the whole window (`full_ctx`)."""
        out = {}
        C = self.cmp_len
        if self.cont:
            w = self.view(blotch(ids, torch.zeros(len(ids), dtype=torch.long), 0, spec, train=False))
            logits = self(w.input_ids, w.position_ids, w.mask)
            cont_targets = torch.where(w.columns >= C, w.input_ids, IGNORE)
            out["cmp_ctx"] = token_loss(logits, cont_targets.to(logits.device))
        cont, cont_mask = ids[:, C:], valid_mask(ids, spec)[:, C:]
        logits = self._lm(self.base.get_input_embeddings()(cont), cont_mask, rank_positions(cont_mask),
                          use_cache=False).logits
        targets = torch.where(cont_mask[:, 1:], cont[:, 1:], IGNORE)
        out["no_ctx"] = token_loss(logits[:, :-1], targets.to(logits.device))
        v = blotch(ids, torch.zeros(len(ids), dtype=torch.long), 0, dataclasses.replace(spec, incl_intl_prob=False),
                   train=False)
        logits = self._lm(self.base.get_input_embeddings()(v.input_ids), v.mask, v.position_ids, use_cache=False).logits
        out["full_ctx"] = token_loss(logits, v.targets.to(logits.device))
        return {f"{name}_{k}": float(getattr(r, k)) for name, r in out.items() for k in ("nll", "correct", "count")}

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: Any = None
               ) -> tuple[torch.Tensor, Any]:
        """Incremental decoding: the first call compresses the prompt and feeds [compressed; SOS]; later calls
        feed one token each. The decoder's own positions are used (the window frame's are not needed)."""
        from transformers import DynamicCache

        B = len(input_ids)
        k = self.n_cmps + 1
        if cache is None:
            cmpr = self.compress(input_ids, mask)
            x = torch.cat([cmpr, self.embs[self.sos].expand(B, 1, -1)], 1)
            cache = [DynamicCache(), k]
            positions = torch.arange(k, device=input_ids.device).expand(B, k)
        else:
            x = self.base.get_input_embeddings()(input_ids)
            positions = torch.full((B, 1), cache[1], device=input_ids.device)
            cache[1] += 1
        full = torch.ones(B, cache[1], dtype=torch.bool, device=input_ids.device)
        logits = self._lm(x, full, positions, use_cache=True, **{self._cache_kw: cache[0]}).logits
        return logits, cache
