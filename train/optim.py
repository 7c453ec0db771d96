"""AdamW and the learning-rate schedule, as plain functions of the step so a resume needs only the step."""
from __future__ import annotations

import math
from typing import Any

import torch

from train.config import Config

PLATEAU_FACTOR, PLATEAU_THRESHOLD = 0.1, 1e-3  # ReduceLROnPlateau's defaults, as the original used


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.AdamW:
    """Decoupled weight decay `l2` on matrices and embeddings only: decaying gains and biases only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.l2},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


class Schedule:
    """Linear warmup to `lr`, then cosine / inverse_sqrt / constant decay to `min_lr`, or plateau steps.

    `lr(step)` is the rate for the update that makes `step + 1` steps; plateau adds a factor that drops by
    10x when the val loss has not improved by 0.1 % for `patience` validations.
    """

    def __init__(self, cfg: Config, total_steps: int):
        self.cfg, self.total = cfg, max(total_steps, 1)
        self.factor, self.best, self.bad = 1.0, math.inf, 0

    def lr(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "cosine":
            t = (step - c.warmup_steps) / max(self.total - c.warmup_steps, 1)
            return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if c.lr_schedule == "inverse_sqrt":
            return max(c.lr * math.sqrt(max(c.warmup_steps, 1) / (step + 1)), c.min_lr)
        if c.lr_schedule == "plateau":
            return max(c.lr * self.factor, c.min_lr)
        return c.lr

    def on_validation(self, val_loss: float) -> None:
        if self.cfg.lr_schedule != "plateau":
            return
        if val_loss < self.best * (1 - PLATEAU_THRESHOLD):
            self.best, self.bad = val_loss, 0
        else:
            self.bad += 1
            if self.bad >= self.cfg.patience:
                self.factor, self.bad = self.factor * PLATEAU_FACTOR, 0

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor, self.best, self.bad = state["factor"], state["best"], state["bad"]
