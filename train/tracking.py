"""Experiment trackers: the config key `tracker` also sends every metrics.jsonl record to TensorBoard or W&B.

metrics.jsonl stays the record of a run; a tracker is a view of it for comparing runs. Each tracker's package is
imported only when it is chosen, and `check` turns a missing one into a one-line error before training starts.
Tags are `<split>/<key>` (train/loss, val/acc, train/lr, train/tokens_per_s ...) at the record's optimizer step.
A resumed run starts at its first new step: TensorBoard drops the events a killed run wrote past its checkpoint
(`purge_step`), W&B ignores steps it has already seen, so neither shows a step twice.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import netrc
import os
from typing import Any

from train.config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs


def check(name: str) -> None:
    """Raise a ConfigError when the tracker's package is not installed."""
    package = PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"config key 'tracker': {name!r} needs the {package} package, which is not installed "
                          f"(pip install {package})")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as `<split>/<key>` tags."""
    return {f"{record['split']}/{k}": v for k, v in record.items()
            if k not in ("step", "epoch", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Event files in the run folder, so `tensorboard --logdir save_root/exp_name` shows every run of a sweep."""

    def __init__(self, folder: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(folder, purge_step=first_step, flush_secs=10)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        if record["split"] == "val":
            self.writer.flush()  # once per epoch: a run that dies later keeps its validations

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when set; online when an API key is known (environment or `wandb login`'s netrc), else offline,
    so a run never stops to ask for a login."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandB:
    """One W&B run per run folder (project = exp_name, name = the folder's), resumed under the same id."""

    def __init__(self, folder: str, first_step: int):
        import wandb

        with open(os.path.join(folder, "hyperparams.json")) as f:
            hyperparams = json.load(f)  # the public config: storage_options values are not in it
        folder = os.path.abspath(folder)
        self.run = wandb.init(project=hyperparams["exp_name"], name=os.path.basename(folder), dir=folder,
                              config=hyperparams, id=hashlib.sha1(folder.encode()).hexdigest()[:16],
                              resume="allow", mode=wandb_mode())

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(name: str, folder: str, first_step: int) -> TensorBoard | WandB:
    """The tracker for a run folder whose first record in this process is at `first_step`."""
    check(name)
    return {"tensorboard": TensorBoard, "wandb": WandB}[name](folder, first_step)
