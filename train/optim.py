"""AdamW and the learning-rate schedule, as plain functions of the step so a resume needs only the step."""
from __future__ import annotations

import bisect
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
    """Linear warmup to `lr`, then cosine / inverse_sqrt / inverse_power / constant decay to `min_lr`, or plateau
    steps. inverse_power is the Chain of Shortcuts paper's `lr * (warmup / step) ** lr_decay_exp`; inverse_sqrt is
    its exponent 0.5.

    `lr(step)` is the rate for the update that makes `step + 1` steps; plateau adds a factor that drops by
    10x when the val loss has not improved by 0.1 % for `patience` validations. The cosine's horizon is the
    step count the run was started with: a resume with more `n_epochs` leaves every step of that plan as it was
    and adds a new cosine segment, from `lr` down to `min_lr` (no warmup), over the added steps.
    """

    def __init__(self, cfg: Config, total_steps: int):
        self.cfg = cfg
        self.horizons = [max(total_steps, 1)]  # where each cosine segment ends
        self.factor, self.best, self.bad = 1.0, math.inf, 0

    @property
    def total(self) -> int:
        return self.horizons[-1]

    def lr(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "cosine":
            k = bisect.bisect_right(self.horizons, step)
            if k == len(self.horizons):  # past the plan's end
                return c.min_lr
            start = self.horizons[k - 1] if k else c.warmup_steps
            t = (step - start) / max(self.horizons[k] - start, 1)
            return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        if c.lr_schedule in ("inverse_sqrt", "inverse_power"):
            exp = 0.5 if c.lr_schedule == "inverse_sqrt" else c.lr_decay_exp
            return max(c.lr * (max(c.warmup_steps, 1) / (step + 1)) ** exp, c.min_lr)
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
        return {"factor": self.factor, "best": self.best, "bad": self.bad, "horizons": list(self.horizons)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved plan, extended to this run's step count when that is longer."""
        total = self.total
        self.factor, self.best, self.bad = state["factor"], state["best"], state["bad"]
        self.horizons = list(state.get("horizons", [total]))
        if total > self.horizons[-1]:
            self.horizons.append(total)
