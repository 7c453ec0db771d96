"""Greedy decoding with a KV cache, for any of the trainer's models (they all have `decode`).

Every prompt row ends with a real token (padding may come before or inside it, e.g. the padded layout's
left-padded cmp part after a blotch-level token), so each row's next token is in the last column and one
batched call per step decodes all rows. Positions follow the training convention: the rank among
real tokens (`pad_pos_skip`), or the window column (blotch.position_ids).
"""
from __future__ import annotations

import torch
from torch import nn

from train.blotch import position_ids


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, prompt_mask: torch.Tensor, n_new: int, stop_id: int,
           pad_id: int, pad_pos_skip: bool = True) -> torch.Tensor:
    """(B, P) prompts ending in a real token, and their mask -> (B, n_new) greedy tokens; after `stop_id` a row
    is `pad_id`.

    Positions are the window's (what the model was trained on); a compressor decodes at its own instead.
    """
    B, P = prompt.shape
    positions = position_ids(prompt_mask, torch.arange(P, device=prompt.device).expand(B, P), pad_pos_skip)
    next_pos = positions[:, -1] + 1  # the row's last token is a real one
    logits, cache = model.decode(prompt, positions, prompt_mask)
    mask = prompt_mask
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for step in range(n_new):
        token = torch.where(done, pad_id, logits[:, -1].argmax(-1))
        out.append(token)
        done |= token == stop_id
        if step == n_new - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=mask.device)], 1)
        logits, cache = model.decode(token[:, None], (next_pos + step)[:, None], mask, cache)
    tokens = torch.stack(out, 1)
    return torch.cat([tokens, tokens.new_full((B, n_new - tokens.shape[1]), pad_id)], 1)
