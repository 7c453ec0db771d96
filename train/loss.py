"""The token loss: summed, not averaged, so callers can weight micro-batches and ranks by token counts.

Returning sums and counts is what makes gradient accumulation and DDP exact: the step's loss is the sum of
every micro-batch's token losses over the step's total target count, and the logged loss is a true per-token
mean, never divided by n_grad_loops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.blotch import IGNORE, Blotched

SUMS = ("nll", "correct", "count", "tokens", "blotched", "valid")  # what a batch adds to a train or val record


@dataclass
class TokenLoss:
    objective: torch.Tensor  # summed training objective (label-smoothed when asked), differentiable
    nll: torch.Tensor  # summed plain cross entropy, detached: what is logged, exp(mean) is perplexity
    correct: torch.Tensor  # number of argmax hits, detached
    count: torch.Tensor  # number of counted targets


def token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> TokenLoss:
    """Cross entropy over targets != IGNORE, computed in float32 from one log-softmax."""
    counted = targets != IGNORE
    logp = F.log_softmax(logits[counted].float(), dim=-1)
    t = targets[counted]
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    objective = nll
    if label_smoothing > 0:
        objective = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return TokenLoss(objective.sum(), nll.detach().sum(), (logp.argmax(-1) == t).sum(), counted.sum())


def step_sums(out: TokenLoss, v: Blotched) -> torch.Tensor:
    """The SUMS of one batch, as one tensor on the batch's device (the logits may come back on another with a
    sharded model) so a single all-reduce covers them."""
    counts = torch.stack([v.mask.sum(), v.blotched.sum(), v.valid.sum()])
    return torch.cat([torch.stack([out.nll, out.correct, out.count]).to(counts.device), counts]).float()


def token_means(sums: dict[str, float]) -> dict[str, float]:
    """The per-token loss, accuracy and perplexity of summed batches: what train, val and eval records report."""
    count = max(sums["count"], 1.0)
    loss = sums["nll"] / count
    return {"loss": loss, "acc": sums["correct"] / count, "ppl": math.exp(min(loss, 50.0))}
