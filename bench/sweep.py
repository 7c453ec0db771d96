"""Sweep benchmark on CPU, in one run: 4 tiny runs (blotch_p x seed) three ways, side by side:

  (a) back to back: `python -m train` four times, one after the other, each with every core (what one would
      type without a sweep);
  (b) `python -m train.sweep --runs_per_device 2`: the local executor, two runs at a time, the cores split
      between them (target: <= 0.7 x (a));
  (c) `python -m train.sweep --executor ray`: the same through Ray Tune on a local Ray instance, one CPU per
      trial, Ray's start included (target: <= 1.2 x (b));
  (d) the same with `--address` of a Ray instance already running (as on a cluster), whose start is timed once,
      on its own: (c) less (d) is what starting Ray costs, (d) less (b) what Tune's trials cost.

Run `python bench/sweep.py` (part of `make bench`). Timings on a shared 2-core machine vary by +-30 %: with
--repeats N the three alternate N times and each figure is the median.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.conftest import write_dataset  # noqa: E402

RANGES = {"blotch_p": [0.1, 0.3], "seed": [0, 1]}
MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "h_mult": 2, "drop_p": 0.0, "device": "cpu", "batch_size": 32,
         "lr": 3e-3, "warmup_steps": 10, "log_mod": 10, "val_batch_size": 64, "max_val_loops": 2, "n_epochs": 2,
         "gen_val_samples": 16}


def timed(argv: list[str], **extra_env: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **extra_env}
    t = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def start_ray() -> tuple[str, Any, float]:
    """A Ray instance of every core, started once, as a cluster that is already up; its files in a folder of its
    own, so (c)'s local instances never find and join it."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under 108 bytes
    os.environ["RAY_TMPDIR"] = tmp
    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count(), "include_dashboard": False})
    seconds = time.perf_counter() - t
    del os.environ["RAY_TMPDIR"]
    return tmp, cluster, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per epoch of each run (2 epochs)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-sweep-")
    write_dataset(os.path.join(tmp, "data", "arith"), {"train": 4000, "val": 256}, cmp_len=16, seq_len=32,
                  content="arithmetic", samples_per_shard=1000)
    ranges = os.path.join(tmp, "ranges.json")
    with open(ranges, "w") as f:
        json.dump(RANGES, f)

    def config(name: str) -> str:
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w") as f:
            json.dump({**MODEL, "n_train_loops": args.steps, "data_root": os.path.join(tmp, "data"),
                       "dataset": "arith", "save_root": os.path.join(tmp, "runs"), "exp_name": name}, f)
        return path

    load = os.getloadavg()
    ray_tmp, cluster, ray_start = start_ray()
    times: dict[str, list[float]] = {"back to back": [], "sweep, local": [], "sweep, ray": [], "sweep, ray up": []}
    for i in range(args.repeats):
        cfg = config(f"b2b{i}")
        times["back to back"].append(sum(timed(["-m", "train", cfg, "--blotch_p", str(p), "--seed", str(s)])
                                         for p in RANGES["blotch_p"] for s in RANGES["seed"]))
        local = ["-m", "train.sweep", config(f"local{i}"), ranges, "--runs_per_device", "2"]
        times["sweep, local"].append(timed(local))
        times["sweep, ray"].append(timed(["-m", "train.sweep", config(f"ray{i}"), ranges, "--executor", "ray"]))
        times["sweep, ray up"].append(timed(["-m", "train.sweep", config(f"rayup{i}"), ranges, "--executor", "ray",
                                             "--address", cluster.address], RAY_TMPDIR=ray_tmp))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n4 runs of {2 * args.steps} steps (d_model {MODEL['d_model']}, {MODEL['n_layers']} layers) on "
          f"{os.cpu_count()} cores, median of {args.repeats}; load average {load[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (other work on the machine slows (a) most: its runs use every core):")
    print(f"  back to back (python -m train x 4)      {t['back to back']:6.1f} s")
    print(f"  sweep, local executor (2 at a time)     {t['sweep, local']:6.1f} s   "
          f"{t['sweep, local'] / t['back to back']:.2f} x back to back (target <= 0.7)")
    print(f"  sweep, ray executor (local instance)    {t['sweep, ray']:6.1f} s   "
          f"{t['sweep, ray'] / t['sweep, local']:.2f} x the local executor (target <= 1.2)")
    print(f"  sweep, ray executor (running instance)  {t['sweep, ray up']:6.1f} s   "
          f"{t['sweep, ray up'] / t['sweep, local']:.2f} x the local executor (starting that instance took "
          f"{ray_start:.1f} s)")
    cluster.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"(outputs in {tmp})")


if __name__ == "__main__":
    main()
