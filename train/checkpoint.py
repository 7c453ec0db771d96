"""Run folders and checkpoints: atomic writes, a `latest` pointer, the last K kept.

A checkpoint holds everything a resume needs (model, optimizer, schedule, scaler, every RNG, the loader's
place, the log positions), so a run killed at any moment restarts from its last checkpoint as if nothing
had happened. Files are written under a temporary name and renamed, so a kill never leaves half a file.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import Any

import torch

LATEST = "latest"
_CHECKPT = re.compile(r"^checkpt_(\d+)\.pt$")


def new_run_folder(save_root: str, exp_name: str) -> str:
    """save_root/exp_name/exp_name_<N>, N the first free number (the original's naming), created now."""
    exp = os.path.join(os.path.expanduser(save_root), exp_name)
    os.makedirs(exp, exist_ok=True)
    n = 0
    while True:
        folder = os.path.join(exp, f"{exp_name}_{n}")
        try:
            os.mkdir(folder)  # atomic: two runs starting together get different numbers
            return folder
        except FileExistsError:
            n += 1


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_partial_writes(folder: str) -> None:
    """Temporary files a killed run left behind mid-write; their complete versions were never renamed in."""
    for name in os.listdir(folder):
        if ".tmp-" in name:
            os.remove(os.path.join(folder, name))


def checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the folder's checkpoints, oldest first."""
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder) if (m := _CHECKPT.match(n))]
    return sorted(found)


def save(folder: str, step: int, state: dict[str, Any], keep: int) -> str:
    path = os.path.join(folder, f"checkpt_{step}.pt")
    _write_atomic(path, lambda f: torch.save(state, f))
    _write_atomic(os.path.join(folder, LATEST), lambda f: f.write(os.path.basename(path).encode() + b"\n"))
    for _, old in checkpoints(folder)[:-keep]:
        os.remove(old)
    return path


def latest_path(folder: str) -> str:
    pointer = os.path.join(folder, LATEST)
    if not os.path.exists(pointer):
        raise FileNotFoundError(f"{folder}: no checkpoint yet (no '{LATEST}' file); nothing to resume")
    with open(pointer) as f:
        return os.path.join(folder, f.read().strip())


def load(path: str) -> dict[str, Any]:
    """A checkpoint file, or a run folder's latest one."""
    if os.path.isdir(path):
        path = latest_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location="cpu", weights_only=False)
