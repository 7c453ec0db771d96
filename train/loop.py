"""The training loop: epochs of optimizer steps over the blotched stream, validation, checkpoints and logs.

Read top to bottom: `train` builds the run (data, model, optimizer, schedule, scaler; restored from a
checkpoint on resume), then each epoch is `steps_per_epoch` calls of `train_step`, a validation, and a
checkpoint. Losses are sums over target tokens divided by the step's global target count, so accumulation
and DDP give the same update as one big batch, and every logged loss is a true per-token mean.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from train import checkpoint, dist
from train import eval as evaluation
from train.blotch import IGNORE, Blotched, blotch
from train.config import Config
from train.data import SPLITS, Data, Source, TrainStream, open_data, open_source, rng_neutral
from train.loss import SUMS, step_sums, token_loss
from train.model import build_model, model_view
from train.optim import Schedule, build_optimizer
from train.runlog import RunLog, decode, plot_curves, read_metrics, render_example

N_EXAMPLES = 3


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done
    step_in_epoch: int = 0
    window: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMS, 0.0))  # since the last train line
    window_steps: int = 0
    window_grad_norm: float = 0.0  # summed over the window's steps (the same on every rank, so not reduced)


@dataclass
class Run:
    cfg: Config
    ctx: dist.Context
    data: Data
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, DDP-wrapped when distributed
    opt: torch.optim.Optimizer
    sched: Schedule
    scaler: torch.amp.GradScaler
    stream: TrainStream
    log: RunLog
    folder: str
    progress: Progress
    val_start: dict[str, Any] = field(default_factory=dict)  # the val loader's state at its start
    tokenizer: Any = None  # the dataset's, for examples; None shows token ids

    def autocast(self):
        return evaluation.autocast_for(self.cfg, self.ctx.device)()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def steps_per_epoch(cfg: Config, batches_per_pass: int) -> int:
    """`n_train_loops`, or one pass of the train split (the last step taking the pass's partial tail)."""
    return cfg.n_train_loops or math.ceil(batches_per_pass / cfg.n_grad_loops)


def micro_batches(cfg: Config, batches_per_pass: int, step_in_epoch: int) -> int:
    if cfg.n_train_loops:
        return cfg.n_grad_loops
    return min(cfg.n_grad_loops, batches_per_pass - step_in_epoch * cfg.n_grad_loops)


def train_step(run: Run) -> tuple[dict[str, float], float]:
    """One optimizer step over the next micro-batches; returns the step's sums reduced over ranks, and the
    gradient norm before clipping."""
    cfg, ctx = run.cfg, run.ctx
    n_micro = micro_batches(cfg, len(run.data.train), run.progress.step_in_epoch)
    micro = [run.stream.next() for _ in range(n_micro)]
    views = [model_view(run.model, blotch(b["input_ids"].to(ctx.device), b["sample_id"], pass_, run.data.spec))
             for pass_, b in micro]
    n_targets = dist.all_reduce_sum(torch.stack([(v.targets != IGNORE).sum() for v in views]).sum(), ctx)
    scale = ctx.world / n_targets.clamp(min=1).float()  # DDP averages over ranks; this turns it into a sum
    sums = torch.zeros(len(SUMS), device=ctx.device)
    for i, v in enumerate(views):
        last = i == len(views) - 1
        with contextlib.nullcontext() if last or not ctx.distributed else run.ddp.no_sync():
            with run.autocast():
                logits = run.ddp(v.input_ids, v.position_ids, v.mask)
            out = token_loss(logits, v.targets, cfg.label_smoothing)
            run.scaler.scale(out.objective * scale).backward()
        sums += step_sums(out, v)
    lr = run.sched.lr(run.progress.step)
    for group in run.opt.param_groups:
        group["lr"] = lr
    run.scaler.unscale_(run.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return dict(zip(SUMS, dist.all_reduce_sum(sums, run.ctx).tolist())), float(grad_norm)


def validate(run: Run) -> tuple[dict[str, Any], list[str]]:
    """The val record and a few examples, from one pass over val: unblotched teacher-forced loss and accuracy on
    up to max_val_loops batches, free-running metrics on about gen_val_samples samples split over the ranks, and
    a compressor's baselines (eval.validation_pass)."""
    cfg, ctx, data = run.cfg, run.ctx, run.data
    data.val.load_state_dict(run.val_start)
    examples: list[str] = []

    def show(batch: dict[str, torch.Tensor], v: Blotched, logits: torch.Tensor) -> None:
        examples.extend(render_examples(run, batch, v, logits))

    val = evaluation.validation_pass(run.model, rng_neutral(data.val), data.spec, data.manifest.seq_len,
                                     data.manifest.layout, ctx.device, run.autocast, cfg.max_val_loops,
                                     math.ceil(cfg.gen_val_samples / ctx.world),
                                     lambda t: dist.all_reduce_sum(t, ctx), first=show if ctx.main else None)
    return {**make_record(run, "val", val.sums, val.seconds), **val.record}, examples


def render_examples(run: Run, batch: dict[str, torch.Tensor], v: Blotched, logits: torch.Tensor) -> list[str]:
    """The first val windows with their training view's blotched spans marked, and the model's predictions."""
    ids, sids = batch["input_ids"][:N_EXAMPLES], batch["sample_id"][:N_EXAMPLES]
    view = blotch(ids.to(run.ctx.device), sids, run.stream.dl.dataset.epoch, run.data.spec)
    preds = logits[:N_EXAMPLES].argmax(-1)
    lines = []
    for b in range(len(ids)):
        text = render_example(run.tokenizer, ids[b].tolist(), view.valid[b].tolist(), view.blotched[b].tolist(),
                              run.data.spec.cmp_len)
        counted = v.targets[b] != IGNORE
        pred, targ = preds[b][counted].tolist(), v.targets[b][counted].tolist()
        lines += [f"  [{int(sids[b])}] {text}", f"      target {decode(run.tokenizer, targ)!r}",
                  f"      pred   {decode(run.tokenizer, pred)!r}"]
    return lines


def make_record(run: Run, split: str, sums: dict[str, float], seconds: float) -> dict[str, Any]:
    count = max(sums["count"], 1.0)
    rec = {"step": run.progress.step, "epoch": run.progress.epoch + 1, "split": split,
           "loss": sums["nll"] / count, "acc": sums["correct"] / count,
           "lr": run.sched.lr(max(run.progress.step - 1, 0)),
           "tokens_per_s": sums["tokens"] / max(seconds, 1e-9),
           "blotch_frac": sums["blotched"] / max(sums["valid"], 1.0)}
    if split == "val":
        rec["ppl"] = math.exp(min(rec["loss"], 50.0))
    return rec


def save_checkpoint(run: Run) -> None:
    """Every rank takes part (RNG states are gathered); rank 0 writes."""
    rng = [rng_state()]
    if run.ctx.distributed:
        rng = [None] * run.ctx.world
        torch.distributed.all_gather_object(rng, rng_state())
    if not run.ctx.main:
        return
    state = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "schedule": run.sched.state_dict(),
             "scaler": run.scaler.state_dict(), "rng": rng, "loader": run.stream.state_dict(),
             "progress": asdict(run.progress), "logs": run.log.positions(), "config": run.cfg.to_dict(public=True),
             "world": run.ctx.world}
    checkpoint.save(run.folder, run.progress.step, state, run.cfg.keep_checkpoints)


def restore(run: Run, state: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["schedule"])
    run.scaler.load_state_dict(state["scaler"])
    run.stream.load_state_dict(state["loader"])
    run.progress = Progress(**state["progress"])
    if state["world"] == run.ctx.world:
        set_rng_state(state["rng"][run.ctx.rank])
    else:  # another world size: the data and blotching stay exact, dropout draws start afresh
        seed_everything(run.cfg.seed + run.ctx.rank + run.progress.step)


def load_tokenizer(run: Run):
    from shards import storage
    from shards.summary import load_tokenizer as load

    fs, root = storage.open_fs(run.data.url, run.cfg.storage_options)
    try:
        return load(fs, root)
    except (OSError, ValueError) as e:
        run.log.text(f"no tokenizer in {run.data.url}/tokenizer ({type(e).__name__}); examples show token ids")
        return None


def build(cfg: Config, folder: str, resume: dict[str, Any] | None, source: Source | None = None) -> Run:
    ctx = dist.setup(cfg)
    data = open_data(source or open_source(cfg, SPLITS), ctx.rank, ctx.world)
    cfg = data.cfg
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, data.manifest.vocab_size, data.manifest.window)
    if not cfg.model_parallel:  # a device-mapped model is already spread over the GPUs
        model = model.to(ctx.device)
    if cfg.init_checkpt and resume is None:
        model.load_state_dict(checkpoint.load(cfg.init_checkpt)["model"])
    ddp = model
    if ctx.distributed:
        ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    seed_everything(cfg.seed + ctx.rank)
    total_steps = cfg.n_epochs * steps_per_epoch(cfg, len(data.train))
    run = Run(cfg, ctx, data, model, ddp, build_optimizer(cfg, model), Schedule(cfg, total_steps),
              torch.amp.GradScaler(ctx.device.type, enabled=cfg.torch_dtype == "float16"), TrainStream(data.train),
              RunLog(folder, ctx.main, resume["logs"] if resume else None, cfg.tracker), folder, Progress())
    run.val_start = data.val.state_dict()
    if resume is not None:
        restore(run, resume)
    run.tokenizer = load_tokenizer(run) if ctx.main else None
    return run


def train(cfg: Config, folder: str, resume: dict[str, Any] | None = None, source: Source | None = None
          ) -> dict[str, Any]:
    """Train to the end of `n_epochs`; returns the last validation record. `source` is cfg's data when the caller
    has opened it already (the manifest is then not fetched again)."""
    from tqdm import tqdm

    run = build(cfg, folder, resume, source)
    cfg, ctx, p = run.cfg, run.ctx, run.progress
    if ctx.main and resume is None:
        with open(os.path.join(folder, "hyperparams.json"), "w") as f:
            json.dump({**cfg.to_dict(public=True), "world_size": ctx.world}, f, indent=1, sort_keys=True)
        n_params = sum(q.numel() for q in run.model.parameters())
        run.log.text(f"{folder}: {run.data.url} ({run.data.manifest.name}, window {run.data.manifest.window}), "
                     f"{n_params / 1e6:.2f}M params, {ctx.world} x {ctx.device}, {cfg.torch_dtype}")
    elif ctx.main:
        run.log.text(f"resumed {folder} at step {p.step} (epoch {p.epoch + 1})")
    n_steps = steps_per_epoch(cfg, len(run.data.train))
    bar = tqdm(total=run.sched.total, initial=p.step, disable=None if ctx.main else True,  # None: no bar in a file
               unit="step", dynamic_ncols=True)
    last_val: dict[str, Any] = {}
    t_window = time.perf_counter()
    while p.epoch < cfg.n_epochs:
        t_epoch = time.perf_counter()
        while p.step_in_epoch < n_steps:
            sums, grad_norm = train_step(run)
            if not math.isfinite(sums["nll"]):  # the same on every rank (reduced), so all of them stop here
                raise FloatingPointError(f"train loss is {sums['nll']} at step {p.step + 1}: the run diverged")
            p.step, p.step_in_epoch, p.window_steps = p.step + 1, p.step_in_epoch + 1, p.window_steps + 1
            p.window = {k: p.window[k] + sums[k] for k in SUMS}
            p.window_grad_norm += grad_norm
            bar.update(1)
            if p.step % cfg.log_mod == 0 or p.step_in_epoch == n_steps:
                rec = make_record(run, "train", p.window, time.perf_counter() - t_window)
                rec["grad_norm"] = p.window_grad_norm / p.window_steps
                run.log.metrics(rec)
                bar.set_postfix(epoch=p.epoch + 1, loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                p.window, p.window_steps, p.window_grad_norm = dict.fromkeys(SUMS, 0.0), 0, 0.0
                t_window = time.perf_counter()
            if cfg.checkpt_mod and p.step % cfg.checkpt_mod == 0:
                save_checkpoint(run)
        last_val, examples = validate(run)
        run.log.metrics(last_val)
        bar.clear()
        run.log.text(f"epoch {p.epoch + 1}/{cfg.n_epochs} step {p.step}: val loss {last_val['loss']:.4f} "
                     f"acc {last_val['acc']:.4f} ppl {last_val['ppl']:.3f} ({time.perf_counter() - t_epoch:.1f} s)")
        if evaluation.describe(last_val):
            run.log.text(f"  free-running: {evaluation.describe(last_val)}")
        run.log.text("  examples (⟦ ⟧ = blotched in training, ‖ = end of the compression part):")
        for line in examples:
            run.log.text(line)
        run.sched.on_validation(last_val["loss"])
        p.epoch, p.step_in_epoch = p.epoch + 1, 0
        save_checkpoint(run)
        if ctx.main:
            plot_curves(folder)
        t_window = time.perf_counter()
    bar.close()
    run.log.close()
    if ctx.main and last_val:
        first = next(r for r in read_metrics(folder) if r["split"] == "val")
        plot = os.path.join(folder, "curves.png")
        run.log.text(f"done: val loss {first['loss']:.4f} -> {last_val['loss']:.4f}, acc {first['acc']:.4f} -> "
                     f"{last_val['acc']:.4f} after {p.step} steps\n  outputs: {folder}/ (metrics.jsonl, "
                     f"training_log.txt, {os.path.basename(checkpoint.latest_path(folder))})\n"
                     f"  plot:    {plot if os.path.exists(plot) else 'none (matplotlib is not installed)'}")
    del run  # DDP's reducer holds work on the process group: release it before the group goes
    dist.teardown(ctx)
    return last_val
