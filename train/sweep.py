"""`python -m train.sweep CONFIG.json RANGES.json [--key value ...]`: train every combination of a ranges file.

A ranges file is a JSON object of config key -> list of values; the runs are the product of the lists, in file
order. A "combos" object holds lists of equal length that are paired element-wise (one run per index) and
crossed with the rest, as in the original:

    {"blotch_p": [0.1, 0.3], "combos": {"seed": [0, 1], "lr": [0.001, 0.002]}}    4 runs

Every combination is checked by the trainer's Config before anything starts or is created. A run's folder is
save_root/exp_name/exp_name_<N>_<key><value>... (the original's naming: the swept keys only, values without
spaces, brackets, quotes, commas or slashes). save_root/exp_name/sweep.json records the base config, the ranges
and each combination's folder and status, so a combination always maps to the same folder, and the same command
again is the resume: finished runs are skipped, the others continue from their latest checkpoint as
`python -m train --resume` does (or start afresh when they have none), and new combinations start.

Each run is a `python -m train` subprocess whose output goes to its own training_log.txt, on this machine
(`--executor local`: a pool over the GPUs, or over the CPU cores) or on a Ray cluster (`--executor ray`,
train/sweep_ray.py). At the end the experiment's results table and plots are written (train/report.py).
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import re
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from tqdm import tqdm

from shards.cluster import check_reachable
from shards.storage import write_local_atomic
from train import report, tracking
from train.config import (Config, ConfigError, check_keys, dict_valued, load_config, parse_overrides,
                          read_json_object)
from train.launch import (STOP_SIGNALS, Child, Events, RunSpec, StopBetweenPolls, last_line, stop,
                          stop_on_signals)
from train.sweep_ray import run_ray

COMBOS = "combos"
# Keys that place the sweep, or would put credentials into folder names: set them in the base config.
NOT_SWEPT = ("exp_name", "save_root", "storage_options")
UNSAFE = re.compile(r"[\s\[\](){}'\",/\\]")  # what the original removed from values in folder names
POLL_S = 0.2
VALUED = ("--executor", "--devices", "--runs_per_device", "--gpus_per_run", "--cpus_per_run", "--address")
FLAGS = ("--dry_run", "-h", "--help")


# -- the ranges file ------------------------------------------------------------------------------------------

def check_values(path: str, key: str, values: Any) -> None:
    if not isinstance(values, list):
        raise ConfigError(f"{path}: {key!r} must be a list of values, not {json.dumps(values)}")
    if not values:
        raise ConfigError(f"{path}: {key!r} has no values (an empty list)")


def load_ranges(path: str) -> dict[str, Any]:
    """The ranges file, checked: config keys only, non-empty lists, combos of equal length, no key twice."""
    ranges = read_json_object(path, "ranges file")
    if not ranges:
        raise ConfigError(f"ranges file {path}: no keys to sweep")
    combos = ranges.get(COMBOS, {})
    if COMBOS in ranges and (not isinstance(combos, dict) or not combos):
        raise ConfigError(f"{path}: {COMBOS!r} must be an object of config key -> list of values")
    grid = {k: v for k, v in ranges.items() if k != COMBOS}
    check_keys({key.partition(".")[0]: v for key, v in {**grid, **combos}.items()}, path)
    for key in (k for k in (*grid, *combos) if "." in k):
        if not dict_valued(key.partition(".")[0]):
            raise ConfigError(f"{path}: {key!r}: only a dict-valued key takes a dotted entry ({key.partition('.')[0]!r} "
                              f"is not one)")
    for key, values in [*grid.items(), *combos.items()]:
        check_values(path, key, values)
    for key in (*grid, *combos):
        if key in NOT_SWEPT:
            raise ConfigError(f"{path}: {key!r} cannot be swept (keys {list(NOT_SWEPT)} go in the base config)")
    both = sorted(set(grid) & set(combos))
    if both:
        raise ConfigError(f"{path}: {both[0]!r} is both in the grid and in {COMBOS!r}")
    lengths = {k: len(v) for k, v in combos.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{path}: the lists in {COMBOS!r} must have equal lengths, got {lengths}")
    return ranges


def swept_keys(ranges: dict[str, Any]) -> list[str]:
    """In file order, the keys of combos where combos stands."""
    return [k for key, v in ranges.items() for k in (v if key == COMBOS else [key])]


def expand(ranges: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination, as key -> value: the product of the lists in file order, combos one axis of its own."""
    axes = [[dict(zip(v, column)) for column in zip(*v.values())] if key == COMBOS else [{key: x} for x in v]
            for key, v in ranges.items()]
    return [{k: x for part in combo for k, x in part.items()} for combo in itertools.product(*axes)]


def with_values(cfg: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`values` over a config; a dotted key ("hf_config.num_hidden_layers") sets one entry of a dict-valued key,
    so a sweep can vary a model's depth without repeating the whole hf_config."""
    out = dict(cfg)
    for key, value in values.items():
        top, dot, entry = key.partition(".")
        out[top] = {**(out.get(top) or {}), entry: value} if dot else value
    return out


def describe(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def folder_suffix(keys: list[str], values: dict[str, Any]) -> str:
    return "".join(f"_{k}{UNSAFE.sub('', str(values[k]))}" for k in keys)


def identity(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


# -- sweep.json -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    folder: str  # under the experiment folder
    values: dict[str, Any]  # swept key -> value
    status: str = "pending"  # pending, running, done, failed or stopped
    error: str | None = None  # the last error line of a failed run
    seconds: float = 0.0  # wall time over all its attempts
    node: str | None = None  # the Ray node that ran it last


@dataclass
class Sweep:
    exp: str  # save_root/exp_name
    base: Config  # storage_options values redacted: the credentials are passed to the executors alone
    ranges: dict[str, Any]
    keys: list[str]  # the swept keys, in the order folder names use
    runs: list[Run]  # every run of sweep.json, those of earlier ranges files too
    gpus_per_run: int

    def config(self, run: Run) -> dict[str, Any]:
        """The run's full config. storage_options travel on its command line only (train/launch.py)."""
        cfg = {**with_values(self.base.to_dict(), run.values), "storage_options": None}
        if self.gpus_per_run > 1 and not cfg["model_parallel"]:
            cfg["multi_gpu"] = True  # DDP over the run's GPUs; model_parallel shards one model over them instead
        return cfg

    def save(self) -> None:
        state = {"base": self.base.to_dict(public=True), "ranges": self.ranges, "keys": self.keys,
                 "runs": [asdict(r) for r in self.runs]}
        write_local_atomic(os.path.join(self.exp, report.SWEEP_FILE),
                           lambda f: f.write(json.dumps(state, indent=1).encode() + b"\n"))


def used_numbers(exp: str, exp_name: str, names: list[str]) -> set[int]:
    """The N of every exp_name_<N>... folder, on disk or in sweep.json: a new run takes the first free one."""
    pattern = re.compile(rf"{re.escape(exp_name)}_(\d+)(?:_|$)")
    on_disk = os.listdir(exp) if os.path.isdir(exp) else []
    return {int(m.group(1)) for n in [*on_disk, *names] if (m := pattern.match(n))}


def plan(base: Config, ranges_path: str, gpus_per_run: int) -> tuple[Sweep, list[Run]]:
    """The sweep (sweep.json's state, with this command's new combinations added) and this command's runs, in
    expansion order. Reads only: every error is raised before anything is written."""
    ranges = load_ranges(ranges_path)
    combos = expand(ranges)
    sweep = Sweep(os.path.join(os.path.expanduser(base.save_root), base.exp_name),
                  Config(**base.to_dict(public=True)), ranges, swept_keys(ranges), [], gpus_per_run)
    for i, values in enumerate(combos):
        try:
            cfg = Config(**sweep.config(Run("", values)))
        except ConfigError as e:
            raise ConfigError(f"{ranges_path}: run {i} ({describe(values)}): {e}") from None
        if cfg.multi_gpu and gpus_per_run <= 1:
            raise ConfigError(f"{ranges_path}: run {i}: multi_gpu needs --gpus_per_run N (the GPUs of each run)")
        tracking.check(cfg.tracker)
    saved = report.read_sweep(sweep.exp)
    if saved is not None:
        if sorted(saved["keys"]) != sorted(sweep.keys):
            raise ConfigError(f"{sweep.exp}/{report.SWEEP_FILE} sweeps {saved['keys']}, {ranges_path} sweeps "
                              f"{sweep.keys}: sweep other keys under another exp_name")
        old = {**Config().to_dict(public=True), **saved["base"]}  # keys added to Config since keep their default
        new = sweep.base.to_dict()
        changed = sorted(k for k in new if k not in sweep.keys and old.get(k) != new[k])
        if changed:
            raise ConfigError(f"{sweep.exp}/{report.SWEEP_FILE}: the base config differs in {changed}; run with the "
                              f"same config and overrides, or sweep under another exp_name")
        sweep.keys, sweep.runs = saved["keys"], [Run(**r) for r in saved["runs"]]
    known = {identity(r.values): r for r in sweep.runs}
    used = used_numbers(sweep.exp, base.exp_name, [r.folder for r in sweep.runs])
    runs = []
    for values in combos:
        run = known.get(identity(values))
        if run is None:
            n = next(i for i in itertools.count() if i not in used)
            used.add(n)
            run = Run(f"{base.exp_name}_{n}{folder_suffix(sweep.keys, values)}", values)
            sweep.runs.append(run)
            known[identity(values)] = run
        runs.append(run)
    return sweep, runs


def lock(exp: str) -> TextIO:
    """Hold the experiment's lock while this sweep runs: a second sweep would start the same runs twice. The
    kernel drops it when the process dies, however it dies."""
    f = open(os.path.join(exp, report.LOCK_FILE), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{exp}: another sweep is running there (it holds {report.LOCK_FILE})") from None
    return f


# -- progress: sweep.json and the terminal --------------------------------------------------------------------

class Progress:
    """The sweep's side of `Events`: each start and end of a run goes to sweep.json (atomically) and to the
    terminal as one line, under one bar of runs done with an ETA. `todo` are the runs the executor got, in the
    order of its specs."""

    def __init__(self, sweep: Sweep, runs: list[Run], todo: list[Run]):
        self.sweep, self.todo = sweep, todo
        self.bar = tqdm(total=len(runs), initial=len(runs) - len(todo), unit="run", desc=os.path.basename(sweep.exp),
                        dynamic_ncols=True, file=sys.stderr, disable=None)  # None: no bar when not a terminal

    def started(self, i: int, resumed_from: str | None) -> None:
        run = self.todo[i]
        run.status, run.error = "running", None
        self.sweep.save()
        self.bar.write(f"start  {run.folder}" + (f" (resumes from {resumed_from})" if resumed_from else ""),
                       file=sys.stdout)

    def finished(self, i: int, ok: bool, seconds: float, error: str | None = None) -> None:
        run, folder = self.todo[i], os.path.join(self.sweep.exp, self.todo[i].folder)
        run.seconds += seconds
        run.status, run.error = ("done", None) if ok else ("failed", error or last_line(folder) or "no error line")
        self.sweep.save()
        self.bar.update(1)
        if ok:
            row = report.summarize(folder, report.records_of(folder), None, None)
            metrics = "" if row["val_loss"] is None else f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
            metrics += "" if row["answer_acc"] is None else f" answer_acc {row['answer_acc']:.4f}"
            self.bar.write(f"done   {run.folder}: {metrics} ({seconds:.0f} s)", file=sys.stdout)
        else:
            self.bar.write(f"FAILED {run.folder}: {run.error}", file=sys.stdout)

    def stopped(self, i: int, seconds: float) -> None:
        self.todo[i].status = "stopped"
        self.todo[i].seconds += seconds
        self.sweep.save()

    def placed(self, i: int, node: str) -> None:
        self.todo[i].node = node

    def close(self) -> None:
        self.bar.close()


# -- the local executor ---------------------------------------------------------------------------------------

@dataclass
class Slot:
    gpus: str  # the CUDA_VISIBLE_DEVICES of its runs; "" for CPU runs
    threads: int  # torch threads (OMP_NUM_THREADS) of its runs


def visible_gpus() -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(devices: str | None, runs_per_device: int, gpus_per_run: int | None) -> list[Slot]:
    """Where runs go: `runs_per_device` at a time per group of `gpus_per_run` GPUs (each group its own
    CUDA_VISIBLE_DEVICES), or on CPU `runs_per_device` at a time; the cores are split evenly between all slots
    so that concurrent runs do not oversubscribe them (two runs with every thread each run ~20x slower)."""
    ids = visible_gpus() if devices is None else [] if devices == "cpu" else devices.split(",")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not ids or gpus_per_run == 0:
        return [Slot("", max(1, cores // runs_per_device)) for _ in range(runs_per_device)]
    g = gpus_per_run or 1
    if len(ids) % g:
        raise ConfigError(f"--gpus_per_run {g} does not divide the {len(ids)} devices {','.join(ids)}")
    groups = [",".join(ids[i:i + g]) for i in range(0, len(ids), g)]
    n = len(groups) * runs_per_device
    return [Slot(group, max(1, cores // n)) for _ in range(runs_per_device) for group in groups]


def run_local(specs: list[RunSpec], slots: list[Slot], events: Events, storage_options: dict | None) -> None:
    """A pool of `python -m train` subprocesses, one per free slot, in the specs' order."""
    queue, live = list(range(len(specs))), {}  # slot index -> (spec index, child)
    with StopBetweenPolls() as signals:
        try:
            while queue or live:
                for s, slot in enumerate(slots):
                    if s not in live and queue:
                        i = queue.pop(0)
                        live[s] = i, Child(specs[i], slot.threads, slot.gpus, storage_options)
                        events.started(i, live[s][1].resumed_from)
                for s, (i, child) in list(live.items()):
                    rc = child.poll()
                    if rc is not None:
                        del live[s]
                        events.finished(i, rc == 0, child.seconds())
                signals.sleep(POLL_S)
        finally:
            stop([child for _, child in live.values()])
            for i, child in live.values():
                events.stopped(i, child.seconds())


# -- the command line -----------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"command line: {message}")


def parser() -> Parser:
    ap = Parser(prog="python -m train.sweep", allow_abbrev=False,
                usage="python -m train.sweep CONFIG.json RANGES.json [--key value ...] [options]",
                description="Train every combination of a ranges file; --key value overrides the base config as in "
                            "python -m train. Rerun the same command to resume the sweep.")
    ap.add_argument("config", help="the base config (JSON)")
    ap.add_argument("ranges", help="config key -> list of values; \"combos\": lists paired element-wise")
    ap.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: subprocesses on this machine; ray: a Ray Tune trial per run, on a Ray cluster")
    ap.add_argument("--devices", help="local: cpu, or the GPU ids to use, e.g. 0,1,2,3 (default: every visible "
                                      "GPU, else cpu)")
    ap.add_argument("--runs_per_device", type=int, default=1,
                    help="local: concurrent runs per GPU group, or on CPU (sharing the cores)")
    ap.add_argument("--gpus_per_run", type=int, help="GPUs of each run; more than 1: DDP over them (default: 1 "
                                                     "where there are GPUs, else 0)")
    ap.add_argument("--cpus_per_run", type=int, help="ray: CPUs reserved for each run, also its torch threads "
                                                     "(default 1)")
    ap.add_argument("--address", help="ray: the cluster to join (ray start --head prints it); default: start a "
                                      "local Ray instance")
    ap.add_argument("--dry_run", action="store_true", help="print the runs that would start, and exit")
    return ap


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The sweep's own options, and the `--key value` config overrides between them."""
    mine, theirs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if not arg.startswith("-") or name in FLAGS:  # CONFIG, RANGES, or a flag
            mine.append(arg)
            i += 1
        else:
            n = 1 if "=" in arg else 2
            (mine if name in VALUED else theirs).extend(argv[i:i + n])
            i += n
    args = parser().parse_args(mine)
    for name, given, executor in (("--devices", args.devices, "local"), ("--address", args.address, "ray"),
                                  ("--runs_per_device", args.runs_per_device != 1, "local")):
        if given and args.executor != executor:
            raise ConfigError(f"command line: {name} is for --executor {executor}")
    for name, least in (("runs_per_device", 1), ("gpus_per_run", 0), ("cpus_per_run", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise ConfigError(f"command line: --{name} {value}: must be >= {least}")
    return args, parse_overrides(theirs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        base = load_config(args.config, overrides)
        slots = []
        if args.executor == "local":  # a config that asks for the CPU gets CPU slots on a machine with GPUs too
            devices = args.devices or ("cpu" if base.device == "cpu" else None)
            slots = local_slots(devices, args.runs_per_device, args.gpus_per_run)
        gpus_per_run = len(slots[0].gpus.split(",")) if slots and slots[0].gpus else args.gpus_per_run or 0
        sweep, runs = plan(base, args.ranges, gpus_per_run)
        if args.dry_run:
            for run in runs:
                print(f"{run.folder}  {describe(run.values)}  [{run.status}]")
            print(f"{len(runs)} runs in {sweep.exp}, {sum(r.status == 'done' for r in runs)} done; nothing started")
            return 0
        if args.executor == "ray" and args.address:
            check_reachable(args.address)
        os.makedirs(sweep.exp, exist_ok=True)
        held = lock(sweep.exp)
    except ValueError as e:  # a ConfigError, or an --address where no cluster answers
        print(f"error: {e}", file=sys.stderr)
        return 2
    sweep.save()
    todo = [r for r in runs if r.status != "done"]
    if args.executor == "ray":
        where = f"Ray at {args.address}" if args.address else "a local Ray instance"
    elif slots[0].gpus:
        where = f"{len(slots)} at a time, on GPUs " + " ".join(s.gpus for s in slots)
    else:
        where = f"{len(slots)} at a time on CPU, torch threads {slots[0].threads} each"
    print(f"sweep {sweep.exp}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run ({where})")
    stop_on_signals()
    specs = [RunSpec(os.path.abspath(os.path.join(sweep.exp, r.folder)), sweep.config(r), os.getcwd()) for r in todo]
    progress, code = Progress(sweep, runs, todo), 0
    try:
        if todo and args.executor == "ray":
            run_ray(specs, progress, sweep.exp, base.storage_options, args.address, args.gpus_per_run,
                    args.cpus_per_run or 1)
        elif todo:
            run_local(specs, slots, progress, base.storage_options)
    except KeyboardInterrupt:  # Ctrl-C, or Stop
        code = 128 + (STOP_SIGNALS[-1] if STOP_SIGNALS else signal.SIGINT)
    finally:
        progress.close()
        table, paths = report.write_results(sweep.exp)
        held.close()
    print(table + "results: " + ", ".join(paths))
    failed = [r for r in runs if r.status == "failed"]
    if code:
        print("stopped: the same command resumes the sweep", file=sys.stderr)
    elif failed:
        print(f"{len(failed)} of {len(runs)} runs failed: " + "; ".join(f"{r.folder} ({r.error})" for r in failed),
              file=sys.stderr)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
