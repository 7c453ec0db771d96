"""`make cos`: reproduce Chain of Shortcuts (Grant, Kulkarni and Goodman 2023) with one command.

1. preprocess the base config's arithmetic data (a no-op when it is there already);
2. train every run of the ranges file with the sweep (`python -m train.sweep`; the same command again resumes);
3. evaluate each run's latest checkpoint (`python -m train.eval`) at every temperature, CoS runs at every level,
   all on the same val problems and the same sampling noise;
4. write `cos_results.md` (rows: Vanilla, each CoS level, Direct; columns: answer accuracy per temperature, the
   length change and steps at T = 0; the paper's targets checked) and `cos.png` (accuracy against length change,
   one panel per temperature, as the paper's figure 2) into the experiment folder.

    python experiments/cos.py [--config configs/cos/cpu.json] [--ranges configs/cos/cpu_runs.json]
        [--temperatures 0 0.5 0.7] [--gen_samples 500] [--jobs 2] [-- sweep options ...]

Runs are told apart by their config: blotch_tokens is CoS, blotch_p 0 Vanilla, blotch_p 1 Direct. Seeds of
the same condition and depth are averaged.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python experiments/cos.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "cos", "cpu.json"))
    ap.add_argument("--ranges", default=os.path.join(ROOT, "configs", "cos", "cpu_runs.json"))
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7])
    ap.add_argument("--gen_samples", type=int, default=500, help="val problems decoded per level and temperature")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    ap.add_argument("--jobs", type=int, default=2, help="evaluations at a time (their threads split the cores)")
    ap.add_argument("sweep_args", nargs="*", help="after --: options for python -m train.sweep")
    return ap.parse_args(argv)


def run(cmd: list[str], **env: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, **env})


def experiment_folder(config: str) -> str:
    with open(config) as f:
        cfg = json.load(f)
    return os.path.join(ROOT, os.path.expanduser(cfg.get("save_root", "runs")), cfg.get("exp_name", "run"))


def finished_runs(exp: str) -> list[dict[str, Any]]:
    """The sweep's records of its finished runs: folder, values, and their own wall time (`seconds`), which a
    rerun that reuses them does not see."""
    with open(os.path.join(exp, "sweep.json")) as f:
        return [r for r in json.load(f)["runs"] if r["status"] == "done"]


def condition(cfg: dict[str, Any]) -> str:
    if cfg["blotch_tokens"]:
        return "CoS"
    return {0.0: "Vanilla", 1.0: "Direct"}.get(float(cfg["blotch_p"]), f"blotch_p {cfg['blotch_p']:g}")


def depth(cfg: dict[str, Any]) -> int:
    if cfg["model_type"] == "transformer":
        return cfg["n_layers"]
    hf = cfg.get("hf_config") or {}
    return hf.get("num_hidden_layers", hf.get("n_layer", 0))


def evaluate(folder: str, args: argparse.Namespace, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's config and its eval report for its latest checkpoint, computed unless it is there with these
    settings."""
    with open(os.path.join(folder, "hyperparams.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(folder, "latest")) as f:
        step = int(re.search(r"(\d+)", f.read()).group(1))
    path = os.path.join(folder, f"eval_val_step{step}.json")
    want = {(t, cfg["blotch_tokens"]) for t in args.temperatures}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        have = {(r["temperature"], r["blotch_level"] is not None) for r in report["results"]}
        if want <= have and report["gen_samples"] == args.gen_samples and report["seed"] == args.seed:
            return cfg, report
    cmd = [sys.executable, "-m", "train.eval", folder, "--temperature", *map(str, args.temperatures),
           "--gen_samples", str(args.gen_samples), "--seed", str(args.seed)]
    if cfg["blotch_tokens"]:
        cmd += ["--blotch_level", "all"]
    run(cmd, OMP_NUM_THREADS=str(threads))
    with open(path) as f:
        return cfg, json.load(f)


def rows_of(cfg: dict[str, Any], report: dict[str, Any]) -> dict[tuple[str, float | None], dict[float, dict]]:
    """(condition, level) -> temperature -> the eval result."""
    out: dict[tuple[str, float | None], dict[float, dict]] = defaultdict(dict)
    for r in report["results"]:
        out[(condition(cfg), r["blotch_level"])][r["temperature"]] = r
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(reports: list[tuple[dict, dict]]) -> dict[int, dict[tuple[str, float | None], dict[float, dict]]]:
    """depth -> (condition, level) -> temperature -> {metric: [value per seed]}."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for cfg, report in reports:
        for key, by_t in rows_of(cfg, report).items():
            for t, r in by_t.items():
                for metric in ("answer_acc", "len_diff_pct", "gen_steps", "ref_steps", "no_eos"):
                    out[depth(cfg)][key][t][metric].append(r[metric])
    return out


ORDER = {"Vanilla": 0, "CoS": 1, "Direct": 2}


def table(rows: dict[tuple[str, float | None], dict[float, dict]], temps: list[float]) -> list[str]:
    lines = ["| condition | " + " | ".join(f"acc T={t:g}" for t in temps) +
             " | Len Diff % (T=0) | steps (T=0) | no eos (T=0) |",
             "|---" * (len(temps) + 4) + "|"]
    for (cond, level), by_t in sorted(rows.items(), key=lambda kv: (ORDER.get(kv[0][0], 3), kv[0][1] or 0)):
        name = cond if level is None else f"{cond} {level:.2f}"
        cells = []
        for t in temps:
            m, sd = mean_sd(by_t[t]["answer_acc"]) if t in by_t else (float("nan"), 0.0)
            cells.append(f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if sd else ""))
        t0 = by_t.get(0.0) or next(iter(by_t.values()))
        # round first: -0.3 % reads +0, not -0
        cells += [f"{round(mean_sd(t0['len_diff_pct'])[0]):+d}", f"{mean_sd(t0['gen_steps'])[0]:.2f}",
                  f"{100 * mean_sd(t0['no_eos'])[0]:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def targets(rows: dict[tuple[str, float | None], dict[float, dict]]) -> list[str]:
    """The issue's targets: the paper's shape at this scale, each with its measured numbers."""
    def acc(key: tuple[str, float | None], t: float) -> float | None:
        by_t = rows.get(key, {})
        return 100 * mean_sd(by_t[t]["answer_acc"])[0] if t in by_t else None

    def steps(key: tuple[str, float | None]) -> float:
        return mean_sd(rows[key][0.0]["gen_steps"])[0]

    cos = sorted(level for cond, level in rows if cond == "CoS")
    van, direct = acc(("Vanilla", None), 0.0), acc(("Direct", None), 0.0)
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- [{'x' if ok else ' '}] {text}")

    if van is not None:
        check(van >= 90, f"T=0: Vanilla >= 90 % (measured {van:.1f} %)")
    if cos and van is not None:
        low = acc(("CoS", cos[0]), 0.0)
        check(low >= van - 5, f"T=0: CoS at its lowest level within 5 points of Vanilla ({low:.1f} vs {van:.1f})")
        close = [lv for lv in cos[1:] if acc(("CoS", lv), 0.0) >= low - 5]  # within 5 points of the lowest
        shortest = min(close, key=lambda lv: steps(("CoS", lv)), default=None)
        found = shortest is not None and steps(("CoS", shortest)) <= 0.6 * steps(("CoS", cos[0]))
        text = ("no other level is within 5 points" if shortest is None else
                f"the shortest within 5 points: level {shortest:.2f}, {acc(('CoS', shortest), 0.0):.1f} % in "
                f"{steps(('CoS', shortest)):.2f} steps vs {steps(('CoS', cos[0])):.2f}")
        check(found, f"T=0: a CoS level with >= 40 % fewer generated steps within 5 points of CoS's lowest ({text})")
    if direct is not None and van is not None:
        check(direct <= van - 15, f"T=0: Direct >= 15 points below Vanilla ({direct:.1f} vs {van:.1f})")
    hot = acc(("Vanilla", None), 0.7)
    if cos and hot is not None:
        best_hot = max(acc(("CoS", lv), 0.7) for lv in cos)
        check(best_hot >= hot + 10, f"T=0.7: the best CoS level >= Vanilla + 10 points ({best_hot:.1f} vs {hot:.1f})")
    return out


def plot(rows_by_depth: dict, temps: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows_by_depth), len(temps), figsize=(4.5 * len(temps), 4 * len(rows_by_depth)),
                             squeeze=False, sharex=True, sharey=True)
    for row, (d, rows) in zip(axes, sorted(rows_by_depth.items())):
        for ax, t in zip(row, temps):
            cos = sorted((level, by_t[t]) for (cond, level), by_t in rows.items() if cond == "CoS" and t in by_t)
            if cos:
                x = [mean_sd(r["len_diff_pct"])[0] for _, r in cos]
                y = [100 * mean_sd(r["answer_acc"])[0] for _, r in cos]
                ax.plot(x, y, "o-", color="C0", label="CoS levels")
                for (level, _), xi, yi in zip(cos, x, y):
                    ax.annotate(f"{level:.2f}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
            for cond, marker, color in (("Vanilla", "*", "C1"), ("Direct", "s", "C2")):
                r = rows.get((cond, None), {}).get(t)
                if r:
                    ax.plot([mean_sd(r["len_diff_pct"])[0]], [100 * mean_sd(r["answer_acc"])[0]], marker,
                            color=color, markersize=12, label=cond)
            ax.set_title(f"{d} layers, temperature {t:g}")
            ax.set_xlabel("length change vs reference (%)")
            ax.set_ylabel("answer accuracy (%)")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, times = time.perf_counter(), {}
    run([sys.executable, "-m", "preprocess", "--config", args.config])
    times["preprocess"] = time.perf_counter() - started
    run([sys.executable, "-m", "train.sweep", args.config, args.ranges, *args.sweep_args])
    times["train"] = time.perf_counter() - started - sum(times.values())
    exp = experiment_folder(args.config)
    runs = finished_runs(exp)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        evaluated = list(pool.map(lambda r: evaluate(os.path.join(exp, r["folder"]), args, threads), runs))
    times["evaluate"] = time.perf_counter() - started - sum(times.values())
    by_depth = aggregate(evaluated)
    lines = [f"# Chain of Shortcuts at this scale ({os.path.relpath(args.config, ROOT)}, "
             f"{os.path.relpath(args.ranges, ROOT)})", "",
             f"{len(runs)} runs; answer accuracy (%) on the first {args.gen_samples} val problems, sampling seed "
             f"{args.seed}; Len Diff % = generated solution tokens relative to the reference's. Training took "
             f"{sum(r['seconds'] or 0 for r in runs) / 60:.1f} min of run time (sweep.json); this command: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
             + " (finished runs and evaluations are reused)."]
    for d, rows in sorted(by_depth.items()):
        lines += ["", f"## {d} layers", "", *table(rows, args.temperatures), "", "Targets:", *targets(rows)]
    path = os.path.join(exp, "cos_results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(by_depth, args.temperatures, os.path.join(exp, "cos.png"))
    print("\n".join(lines))
    print(f"wrote {path} and {os.path.join(exp, 'cos.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
