"""Where a run computes: its processes (one, or DDP under torchrun: NCCL on GPUs, gloo on CPU), its device and
its precision (`torch_dtype`: bfloat16/float16 run under autocast, float32 without)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist

from train.config import Config, ConfigError


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype = torch.float32

    def autocast(self) -> ContextManager:
        """The compute precision for a forward pass."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (a no-op in a single process)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_world() -> int:
    """Processes started by torchrun (its WORLD_SIZE), 1 for a plain `python -m train`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(cfg: Config) -> Context:
    world = launched_world()
    if world > 1 and not cfg.multi_gpu:
        raise ConfigError(f"config key 'multi_gpu': false, but torchrun started {world} processes; set it to true")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg.torch_dtype)
    if world == 1:
        return Context(0, 1, device, dtype)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device, dtype)


def teardown(ctx: Context) -> None:
    """Every rank leaves together: a rank that tore gloo down while a peer was still finishing its last
    epoch once died with SIGABRT (`terminate called without an active exception`) in CI."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
