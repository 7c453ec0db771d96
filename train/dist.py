"""Processes and devices: single process, or DDP under torchrun (NCCL on GPUs, gloo on CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.config import Config, ConfigError


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device

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
    if world == 1:
        return Context(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def teardown(ctx: Context) -> None:
    """Every rank leaves together: a rank that tore gloo down while a peer was still finishing its last
    epoch once died with SIGABRT (`terminate called without an active exception`) in CI."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
