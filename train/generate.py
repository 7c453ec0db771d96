"""Decoding with a KV cache for any of the trainer's models (they all have `decode`): greedy or sampled.

Every prompt row ends with a real token (padding may come before or inside it, e.g. the padded layout's
left-padded cmp part after a blotch-level token), so each row's next token is in the last column and one
batched call per step decodes all rows. Positions follow the training convention (blotch.position_ids).

Sampling at temperature T > 0 is multinomial over softmax(logits / T), drawn with the Gumbel-max trick from
noise hashed from (seed, sample id, step, token). A row's tokens therefore depend only on the model, its prompt
and those keys: the same seed gives the same outputs whatever the batch size, order, device or world size, and
every level and temperature of one evaluation sees the same noise, so their differences are not sampling luck.
T = 0 is argmax.
"""
from __future__ import annotations

import torch
from torch import nn

from train.blotch import hash_u32, position_ids, words64

_STREAM_SAMPLING = 3  # the blotching hashes use streams 0-2


def gumbel_noise(seed: int, sample_ids: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B, vocab) standard Gumbel noise, a pure function of (seed, sample id, step, token)."""
    row = hash_u32(*words64(sample_ids.long()[:, None]), step, h=hash_u32(_STREAM_SAMPLING, *words64(seed)))
    u = (hash_u32(torch.arange(vocab, device=sample_ids.device), h=row).double() + 0.5) / 2.0**32  # in (0, 1)
    return -torch.log(-torch.log(u))


def next_token(logits: torch.Tensor, temperature: float, seed: int, sample_ids: torch.Tensor, step: int
               ) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    noise = gumbel_noise(seed, sample_ids.to(logits.device), step, logits.shape[-1])
    return (logits.double() / temperature + noise).argmax(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, prompt_mask: torch.Tensor, n_new: int, stop_id: int,
             pad_id: int, pad_pos_skip: bool = True, temperature: float = 0.0, sample_ids: torch.Tensor | None = None,
             seed: int = 0) -> torch.Tensor:
    """(B, P) prompts ending in a real token, and their mask -> (B, n_new) tokens, greedy (temperature 0) or
    sampled; after `stop_id` a row is `pad_id`. `sample_ids` (default 0..B-1) and `seed` key the sampling noise.

    Positions are the window's (what the model was trained on); a compressor decodes at its own instead.
    """
    B, P = prompt.shape
    sample_ids = torch.arange(B) if sample_ids is None else sample_ids
    positions = position_ids(prompt_mask, torch.arange(P, device=prompt.device).expand(B, P), pad_pos_skip)
    next_pos = positions[:, -1] + 1  # the row's last token is a real one
    logits, cache = model.decode(prompt, positions, prompt_mask)
    mask = prompt_mask
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for step in range(n_new):
        token = torch.where(done, pad_id, next_token(logits[:, -1], temperature, seed, sample_ids, step))
        out.append(token)
        done |= token == stop_id
        if step == n_new - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=mask.device)], 1)
        logits, cache = model.decode(token[:, None], (next_pos + step)[:, None], mask, cache)
    tokens = torch.stack(out, 1)
    return torch.cat([tokens, tokens.new_full((B, n_new - tokens.shape[1]), pad_id)], 1)
