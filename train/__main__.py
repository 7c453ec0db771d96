"""`python -m train cfg.json [--key value ...]` starts a run; `python -m train --resume SAVE_FOLDER` continues one.

With `multi_gpu: true` a plain `python -m train` relaunches itself through torch's elastic launcher on every
visible GPU; under `torchrun` it joins the process group torchrun set up.
"""
from __future__ import annotations

import os
import sys

import torch
from torch.distributed.run import main as elastic_launch

from shards import ManifestError, storage
from train import build, checkpoint
from train.config import ConfigError, load_config, parse_overrides, resume_config
from train.data import SPLITS, open_source
from train.dist import launched_world
from train.loop import train

USAGE = "usage: python -m train CONFIG.json [--key value ...] | python -m train --resume SAVE_FOLDER [--key value ...]"


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
        if argv[0] == "--resume":
            if len(argv) < 2:
                raise ConfigError(USAGE)
            resume_folder = argv[1]
            cfg = resume_config(resume_folder, parse_overrides(argv[2:]))
        else:
            cfg = load_config(argv[0], parse_overrides(argv[1:]))
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
    folder = resume_folder or (checkpoint.new_run_folder(cfg.save_root, cfg.exp_name) if main_rank else "")
    train(cfg, folder, state, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
