"""`python -m train.eval SAVE_FOLDER [--split val] [--blotch_level X]`: evaluate a run's latest checkpoint.

The report is the loop's validation pass (validation.validation_pass) on the asked split, printed and written
as `eval_<split>[_level<X>]_step<N>.json` next to the checkpoints. With model_parallel the model is built on the
CPU, loaded, then spread over the GPUs (layers may be offloaded: evaluation does not update them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from shards import ManifestError
from train import checkpoint
from train.blotch import BlotchSpec
from train.build import load_model
from train.config import ConfigError, resume_config
from train.data import eval_loader, open_source, rng_neutral
from train.dist import setup
from train.loss import token_means
from train.validation import validation_pass


def level_index(spec: BlotchSpec, rate: float | None) -> int:
    """The blotch-intensity level asking for `rate` (default: the lowest)."""
    if rate is None:
        return 0
    if not spec.levels:
        raise ConfigError("--blotch_level: the run was not trained with blotch_tokens")
    for i, x in enumerate(spec.levels):
        if abs(x - rate) < 1e-6:
            return i
    raise ConfigError(f"--blotch_level: {rate} is not one of the run's levels {[round(x, 6) for x in spec.levels]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description="Evaluate a run's latest checkpoint.")
    ap.add_argument("save_folder")
    ap.add_argument("--split", default="val")
    ap.add_argument("--checkpoint", help="a checkpoint file (default: the folder's latest)")
    ap.add_argument("--blotch_level", type=float, help="with blotch_tokens: the blotch rate to ask for")
    ap.add_argument("--max_batches", type=int, help="teacher-forced batches (default: the config's max_val_loops)")
    ap.add_argument("--gen_samples", type=int, help="samples decoded greedily (default: the config's gen_val_samples)")
    ap.add_argument("--device", help="torch device (default: the config's)")
    args = ap.parse_args(argv)
    try:
        src = open_source(resume_config(args.save_folder, {"device": args.device} if args.device else {}),
                          [args.split])
        state = checkpoint.load(args.checkpoint or args.save_folder)
        level = level_index(src.spec, args.blotch_level)
        batches = eval_loader(src, args.split, 0, 1)
    except (ConfigError, ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, m = src.cfg, src.manifest
    ctx = setup(cfg.replace(multi_gpu=False))
    model = load_model(cfg, m.vocab_size, m.window, state["model"], ctx.device)
    val = validation_pass(model, rng_neutral(batches), src, ctx, max_batches=args.max_batches or cfg.max_val_loops,
                          gen_samples=cfg.gen_val_samples if args.gen_samples is None else args.gen_samples,
                          level=level)
    step = state["progress"]["step"]
    report = {"save_folder": args.save_folder, "step": step, "split": args.split, "dataset": src.url,
              "blotch_level": args.blotch_level, **token_means(val.sums), "tokens": val.sums["count"], **val.record}
    suffix = "" if args.blotch_level is None else f"_level{args.blotch_level:g}"
    path = os.path.join(args.save_folder, f"eval_{args.split}{suffix}_step{step}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
