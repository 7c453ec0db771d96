"""The training loop: epochs of optimizer steps over the blotched stream, validation, checkpoints and logs.

Read top to bottom: `train` builds the run (data, model, optimizer, schedule, scaler; restored from a
checkpoint on resume), then each epoch is `steps_per_epoch` calls of `train_step` and an `end_of_epoch`
(validation, log lines, checkpoint, plot). Losses are sums over target tokens divided by the step's global
target count, so accumulation and DDP give the same update as one big batch, and every logged loss is a true
per-token mean.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from shards import storage
from shards.summary import load_tokenizer as load_dataset_tokenizer
from train import checkpoint, dist
from train.blotch import IGNORE, Blotched, blotch, prompt
from train.build import build_model
from train.config import Config
from train.data import SPLITS, Data, Source, TrainStream, open_data, open_source, rng_neutral
from train.generate import generate
from train.loss import SUMS, step_sums, token_loss, token_means
from train.optim import Schedule, build_optimizer
from train.rng import rng_state, seed_everything, set_rng_state
from train.runlog import RunLog, decode, describe, plot_curves, read_metrics, render_example
from train.scoring import body, final_answer, n_steps, real_tokens
from train.validation import validation_pass

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
    model: nn.Module
    ddp: DistributedDataParallel | None  # the model's DDP wrapper when distributed
    opt: torch.optim.Optimizer
    sched: Schedule
    scaler: torch.amp.GradScaler
    stream: TrainStream
    log: RunLog
    folder: str
    progress: Progress
    val_start: dict[str, Any] = field(default_factory=dict)  # the val loader's state at its start
    tokenizer: Any = None  # the dataset's, for examples; None shows token ids

    @property
    def src(self) -> Source:
        return self.data.source


def train(cfg: Config, folder: str, resume: dict[str, Any] | None = None, source: Source | None = None
          ) -> dict[str, Any]:
    """Train to the end of `n_epochs`; returns the last validation record. `source` is cfg's data when the caller
    has opened it already (the manifest is then not fetched again)."""
    run = build(cfg, folder, resume, source)
    announce(run, resumed=resume is not None)
    bar = tqdm(total=run.sched.total, initial=run.progress.step, unit="step", dynamic_ncols=True,
               disable=None if run.ctx.main else True)  # None: no bar when stderr is not a terminal (a sweep's run)
    last_val: dict[str, Any] = {}
    try:
        while run.progress.epoch < run.cfg.n_epochs:
            started = time.perf_counter()
            train_epoch(run, bar)
            bar.clear()
            last_val = end_of_epoch(run, started)
    finally:  # a run that diverges or is stopped still flushes its tracker (W&B finishes the run)
        bar.close()
        run.log.close()
    if run.ctx.main and last_val:
        summarize(run, last_val)
    ctx = run.ctx
    del run  # DDP's reducer holds work on the process group: release it before the group goes
    dist.teardown(ctx)
    return last_val


def build(cfg: Config, folder: str, resume: dict[str, Any] | None, source: Source | None = None) -> Run:
    ctx = dist.setup(cfg)
    data = open_data(source or open_source(cfg, SPLITS), ctx.rank, ctx.world)
    cfg, m = data.source.cfg, data.source.manifest
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, m.vocab_size, m.window)
    if not cfg.model_parallel:  # a device-mapped model is already spread over the GPUs
        model = model.to(ctx.device)
    if cfg.init_checkpt and resume is None:
        model.load_state_dict(checkpoint.load(cfg.init_checkpt)["model"])
    ddp = None
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


def announce(run: Run, resumed: bool) -> None:
    """hyperparams.json and the first log line of a new run; one line on resume."""
    cfg, ctx, m = run.cfg, run.ctx, run.src.manifest
    if not ctx.main:
        return
    if resumed:
        run.log.text(f"resumed {run.folder} at step {run.progress.step} (epoch {run.progress.epoch + 1})")
        return
    with open(os.path.join(run.folder, "hyperparams.json"), "w") as f:
        json.dump({**cfg.to_dict(public=True), "world_size": ctx.world}, f, indent=1, sort_keys=True)
    n_params = sum(q.numel() for q in run.model.parameters())
    run.log.text(f"{run.folder}: {run.src.url} ({m.name}, window {m.window}), {n_params / 1e6:.2f}M params, "
                 f"{ctx.world} x {ctx.device}, {cfg.torch_dtype}")


def steps_per_epoch(cfg: Config, batches_per_pass: int) -> int:
    """`n_train_loops`, or one pass of the train split (the last step taking the pass's partial tail)."""
    return cfg.n_train_loops or math.ceil(batches_per_pass / cfg.n_grad_loops)


def micro_batches(cfg: Config, batches_per_pass: int, step_in_epoch: int) -> int:
    if cfg.n_train_loops:
        return cfg.n_grad_loops
    return min(cfg.n_grad_loops, batches_per_pass - step_in_epoch * cfg.n_grad_loops)


def train_epoch(run: Run, bar: tqdm) -> None:
    """The epoch's remaining optimizer steps, a train line every log_mod steps and at the epoch's end, and the
    mid-epoch checkpoints."""
    cfg, p = run.cfg, run.progress
    n_steps = steps_per_epoch(cfg, len(run.data.train))
    t_window = time.perf_counter()
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


def train_step(run: Run) -> tuple[dict[str, float], float]:
    """One optimizer step over the next micro-batches; returns the step's sums reduced over ranks, and the
    gradient norm before clipping."""
    cfg, ctx = run.cfg, run.ctx
    n_micro = micro_batches(cfg, len(run.data.train), run.progress.step_in_epoch)
    micro = [run.stream.next() for _ in range(n_micro)]
    views = [run.model.view(blotch(b["input_ids"].to(ctx.device), b["sample_id"], pass_, run.src.spec))
             for pass_, b in micro]
    n_targets = ctx.all_reduce_sum(torch.stack([(v.targets != IGNORE).sum() for v in views]).sum())
    scale = ctx.world / n_targets.clamp(min=1).float()  # DDP averages over ranks; this turns it into a sum
    net = run.model if run.ddp is None else run.ddp
    sums = torch.zeros(len(SUMS), device=ctx.device)
    for i, v in enumerate(views):
        last = i == len(views) - 1
        with contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync():
            with ctx.autocast():
                logits = net(v.input_ids, v.position_ids, v.mask)
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
    return dict(zip(SUMS, ctx.all_reduce_sum(sums).tolist())), float(grad_norm)


def end_of_epoch(run: Run, started: float) -> dict[str, Any]:
    """Validate, log the record and examples, step a plateau schedule, checkpoint and plot; returns the record."""
    p = run.progress
    val, examples = validate(run)
    run.log.metrics(val)
    run.log.text(f"epoch {p.epoch + 1}/{run.cfg.n_epochs} step {p.step}: val loss {val['loss']:.4f} "
                 f"acc {val['acc']:.4f} ppl {val['ppl']:.3f} ({time.perf_counter() - started:.1f} s)")
    if describe(val):
        run.log.text(f"  free-running: {describe(val)}")
    run.log.text("  examples (⟦ ⟧ = blotched in training, ‖ = end of the compression part):")
    for line in examples:
        run.log.text(line)
    run.sched.on_validation(val["loss"])
    p.epoch, p.step_in_epoch = p.epoch + 1, 0
    save_checkpoint(run)
    if run.ctx.main:
        plot_curves(run.folder)
    return val


def validate(run: Run) -> tuple[dict[str, Any], list[str]]:
    """The val record and a few examples, from one pass over val (validation.validation_pass): unblotched
    teacher-forced loss and accuracy on up to max_val_loops global batches, greedy free-running metrics on the
    split's first gen_val_samples samples, and a compressor's baselines; the same for any number of ranks."""
    cfg, ctx = run.cfg, run.ctx
    run.data.val.load_state_dict(run.val_start)
    examples: list[str] = []

    def show(batch: dict[str, torch.Tensor], v: Blotched, logits: torch.Tensor) -> None:
        examples.extend(render_examples(run, batch, v, logits))

    val = validation_pass(run.model, rng_neutral(run.data.val), run.src, ctx, max_batches=cfg.max_val_loops,
                          gen_samples=cfg.gen_val_samples, on_first=show if ctx.main else None)
    return {**make_record(run, "val", val.sums, val.seconds), **val.record}, examples


def render_examples(run: Run, batch: dict[str, torch.Tensor], v: Blotched, logits: torch.Tensor) -> list[str]:
    """The first val windows with their training view's blotched spans marked, and the model's predictions."""
    ids, sids = batch["input_ids"][:N_EXAMPLES], batch["sample_id"][:N_EXAMPLES]
    view = blotch(ids.to(run.ctx.device), sids, run.stream.dl.dataset.epoch, run.src.spec)
    preds = logits[:N_EXAMPLES].argmax(-1)
    lines = []
    for b in range(len(ids)):
        text = render_example(run.tokenizer, ids[b].tolist(), view.valid[b].tolist(), view.blotched[b].tolist(),
                              run.src.spec.cmp_len)
        counted = v.targets[b] != IGNORE
        pred, targ = preds[b][counted].tolist(), v.targets[b][counted].tolist()
        lines += [f"  [{int(sids[b])}] {text}", f"      target {decode(run.tokenizer, targ)!r}",
                  f"      pred   {decode(run.tokenizer, pred)!r}"]
    return lines


def make_record(run: Run, split: str, sums: dict[str, float], seconds: float) -> dict[str, Any]:
    return {"step": run.progress.step, "epoch": run.progress.epoch + 1, "split": split, **token_means(sums),
            "lr": run.sched.lr(max(run.progress.step - 1, 0)), "tokens_per_s": sums["tokens"] / max(seconds, 1e-9),
            "blotch_frac": sums["blotched"] / max(sums["valid"], 1.0)}


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
    fs, root = storage.open_fs(run.src.url, run.cfg.storage_options)
    try:
        return load_dataset_tokenizer(fs, root)
    except (OSError, ValueError) as e:
        run.log.text(f"no tokenizer in {run.src.url}/tokenizer ({type(e).__name__}); examples show token ids")
        return None


def summarize(run: Run, last_val: dict[str, Any]) -> None:
    """The run's last lines: answer accuracy first where the data has answers (what a model is for), then the
    teacher-forced figures, a solved example, and where the outputs are."""
    first = next(r for r in read_metrics(run.folder) if r["split"] == "val")
    lines = [f"done after {run.progress.step} steps:"]
    if "answer_acc" in last_val:
        lines.append(f"  answer accuracy {first['answer_acc']:.4f} -> {last_val['answer_acc']:.4f} (greedy, "
                     f"{last_val['gen_samples']:.0f} val problems; {last_val['gen_steps']:.2f} steps per solution, "
                     f"{last_val['ref_steps']:.2f} in the data)")
    lines.append(f"  val loss {first['loss']:.4f} -> {last_val['loss']:.4f}, token accuracy {first['acc']:.4f} -> "
                 f"{last_val['acc']:.4f} (teacher-forced)")
    if run.src.has_answers:
        lines += solved_example(run)
    plot = os.path.join(run.folder, "curves.png")
    lines += [f"  outputs: {run.folder}/ (metrics.jsonl, training_log.txt, "
              f"{os.path.basename(checkpoint.latest_path(run.folder))})",
              f"  plot:    {plot if os.path.exists(plot) else 'none (matplotlib is not installed)'}"]
    run.log.text("\n".join(lines))


def solved_example(run: Run, n: int = 32) -> list[str]:
    """The first of `n` val problems the model solves greedily, decoded as it is and, with intensity levels,
    at the lowest and the highest level: what asking for a shortcut does to a solution."""
    spec, c = run.src.spec, run.src.spec.cmp_len
    run.data.val.load_state_dict(run.val_start)
    ids = next(iter(rng_neutral(run.data.val)))["input_ids"][:n].to(run.ctx.device)
    levels = [0, len(spec.levels) - 1] if spec.levels else [0]
    run.model.eval()
    with run.ctx.autocast():
        outs = [generate(run.model, *prompt(ids, spec, level), run.src.manifest.seq_len, spec.eos_id, spec.pad_id,
                         spec.pad_pos_skip).tolist() for level in levels]
    run.model.train()
    seps, eos = set(spec.separator_ids), spec.eos_id
    refs = real_tokens(ids, spec, slice(c, None))

    def right(out: list[int], b: int) -> bool:
        want = final_answer(refs[b], seps, eos)
        return want is not None and final_answer(out, seps, eos) == want

    solved = [b for b in range(len(refs)) if right(outs[0][b], b)]
    if not solved:
        return [f"  solved example: none of the first {len(refs)} val problems is solved yet"]
    b = solved[0]
    lines = [f"  solved example: {decode(run.tokenizer, real_tokens(ids, spec, slice(None, c))[b])}"]
    for level, out in zip(levels, outs):
        name = f"level {spec.levels[level]:.2f}" if spec.levels else "model"
        lines.append(f"    {name}: {decode(run.tokenizer, body(out[b], eos))}  ({'right' if right(out[b], b) else 'wrong'}, "
                     f"{steps_text(n_steps(out[b], seps, eos))})")
    lines.append(f"    data: {decode(run.tokenizer, body(refs[b], eos))}  ({steps_text(n_steps(refs[b], seps, eos))})")
    return lines


def steps_text(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"
