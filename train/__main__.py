"""`python -m train cfg.json [--key value ...]` starts a run; `python -m train --resume SAVE_FOLDER` continues one.

`--save_folder PATH` puts a new run in exactly that folder instead of the next free save_root/exp_name/exp_name_<N>
(a sweep names its runs' folders after the swept values); it must not hold a run already.

With `multi_gpu: true` a plain `python -m train` relaunches itself through torch's elastic launcher on every
visible GPU; under `torchrun` it joins the process group torchrun set up.
"""
from __future__ import annotations

import os
import sys

import torch
from torch.distributed.run import main as elastic_launch

from shards import ManifestError, storage
from train import build, checkpoint, tracking
from train.config import ConfigError, load_config, parse_overrides, resume_config
from train.data import SPLITS, open_source
from train.dist import launched_world
from train.loop import train

USAGE = ("usage: python -m train CONFIG.json [--key value ...] [--save_folder PATH] | "
         "python -m train --resume SAVE_FOLDER [--key value ...]")


def pop_save_folder(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without `--save_folder PATH`, and PATH (None when absent)."""
    if "--save_folder" not in argv:
        return argv, None
    i = argv.index("--save_folder")
    if i + 1 >= len(argv):
        raise ConfigError("command line: --save_folder needs a path")
    folder = argv[i + 1]
    if os.path.exists(os.path.join(folder, "hyperparams.json")):
        raise ConfigError(f"--save_folder {folder}: already holds a run; continue it with --resume {folder}")
    return argv[:i] + argv[i + 2:], folder


def relaunch(argv: list[str]) -> int:
    n = torch.cuda.device_count()
    if n == 0:
        raise ConfigError("config key 'multi_gpu': no visible GPU; on CPU use torchrun --nproc_per_node N -m train")
    elastic_launch(["--standalone", f"--nproc_per_node={n}", "-m", "train", *argv])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    resume_folder = None
    try:
        args, save_folder = pop_save_folder(argv)
        if not args or args[0] == "--resume" and (len(args) < 2 or save_folder):
            raise ConfigError(USAGE)
        if args[0] == "--resume":
            resume_folder = args[1]
            cfg = resume_config(resume_folder, parse_overrides(args[2:]))
        else:
            cfg = load_config(args[0], parse_overrides(args[1:]))
        tracking.check(cfg.tracker)
        source = open_source(cfg, SPLITS)  # a config that disagrees with its data fails before any folder exists
        build.check(source.cfg, source.manifest.vocab_size, source.manifest.window)
        if cfg.multi_gpu and launched_world() == 1 and "LOCAL_RANK" not in os.environ:
            return relaunch(argv)
        state = checkpoint.load(resume_folder) if resume_folder else None
    except (ConfigError, ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    main_rank = os.environ.get("RANK", "0") == "0"
    if resume_folder and main_rank:
        storage.remove_stale_temps(None, resume_folder)
    if save_folder and main_rank:
        os.makedirs(save_folder, exist_ok=True)
    folder = resume_folder or save_folder
    if not folder:
        folder = checkpoint.new_run_folder(cfg.save_root, cfg.exp_name) if main_rank else ""
    train(cfg, folder, state, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
