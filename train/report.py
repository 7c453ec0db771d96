"""`python -m train.report save_root/exp_name [--sort KEY]`: one table and one figure for an experiment's runs.

It reads only what runs write (hyperparams.json, metrics.jsonl) and, for a sweep, its sweep.json (each run's
swept values, status, last error and wall time), so it works mid-sweep, after one, and on a folder of plain
`python -m train` runs, whose "swept" keys are those whose values differ between the runs. It writes into the
experiment folder:

- results.csv and results.md: one row per run (swept values, status, steps, final and best val loss and accuracy,
  answer_acc and gen_steps where the runs have them, training tokens/s, wall time), sorted by --sort (losses
  ascending, accuracies and tokens/s descending), the best row marked with `*`;
- results.png: every run's val loss curve (and answer accuracy) labelled by its swept values, and the final
  metric against each swept key.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import sys
from typing import Any

from shards.storage import write_local_atomic
from train.config import ConfigError
from train.runlog import METRICS, read_metrics

SWEEP_FILE, LOCK_FILE, HYPERPARAMS = "sweep.json", ".sweep.lock", "hyperparams.json"
CSV, MD, PNG = "results.csv", "results.md", "results.png"
METRIC_COLUMNS = ("status", "steps", "val_loss", "best_val_loss", "val_acc", "best_val_acc", "answer_acc",
                  "gen_steps", "tokens_per_s", "wall_s", "error")
OPTIONAL = ("answer_acc", "gen_steps", "error")  # columns shown only when some run has a value
HIGHER_IS_BETTER = {"val_acc", "best_val_acc", "answer_acc", "tokens_per_s"}
NOT_COMPARED = {"storage_options"}  # redacted in hyperparams.json: its differences say nothing


def read_json(path: str) -> dict[str, Any] | None:
    """The file's JSON, None when there is no file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_sweep(exp: str) -> dict[str, Any] | None:
    return read_json(os.path.join(exp, SWEEP_FILE))


def sweep_is_live(exp: str) -> bool:
    """Whether a sweep process holds the experiment's lock now (a killed one holds nothing)."""
    path = os.path.join(exp, LOCK_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def records_of(folder: str) -> list[dict[str, Any]]:
    return read_metrics(folder) if os.path.exists(os.path.join(folder, METRICS)) else []


def summarize(folder: str, records: list[dict[str, Any]], hyperparams: dict[str, Any] | None,
              entry: dict[str, Any] | None) -> dict[str, Any]:
    """One run's row: status and metrics from its records and its sweep.json entry (None for a plain run)."""
    val = [r for r in records if r["split"] == "val"]
    train = [r for r in records if r["split"] == "train"]
    last = val[-1] if val else {}
    if entry is not None:
        status = entry["status"]
    else:
        status = "done" if hyperparams and any(r["epoch"] == hyperparams["n_epochs"] for r in val) else "incomplete"
    wall = entry.get("seconds") if entry else None
    if wall is None and hyperparams is not None and records:  # a plain run: from its first file to its last line
        wall = os.path.getmtime(os.path.join(folder, METRICS)) - os.path.getmtime(os.path.join(folder, HYPERPARAMS))
    return {"status": status, "steps": max((r["step"] for r in records), default=0),
            "val_loss": last.get("loss"), "best_val_loss": min((r["loss"] for r in val), default=None),
            "val_acc": last.get("acc"), "best_val_acc": max((r["acc"] for r in val), default=None),
            "answer_acc": last.get("answer_acc"), "gen_steps": last.get("gen_steps"),
            "tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train) if train else None,
            "wall_s": wall, "error": entry.get("error") if entry else None}


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values differ between runs: what plain runs "swept"."""
    return sorted(k for k in (configs[0] if configs else {}) if k not in NOT_COMPARED
                  and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1)


def collect(exp: str) -> tuple[list[str], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(swept keys, one row per run, each run's val records). The runs are sweep.json's, then every other
    folder that holds a hyperparams.json."""
    sweep = read_sweep(exp)
    entries = {e["folder"]: e for e in sweep["runs"]} if sweep else {}
    live = sweep_is_live(exp)
    others = sorted(n for n in os.listdir(exp)
                    if n not in entries and os.path.isfile(os.path.join(exp, n, HYPERPARAMS)))
    hyper = {n: read_json(os.path.join(exp, n, HYPERPARAMS)) for n in [*entries, *others]}
    swept = list(sweep["keys"]) if sweep else []
    keys = swept + [k for k in varying_keys([h for h in hyper.values() if h]) if k not in swept]
    rows, curves = [], {}
    for name, h in hyper.items():
        folder, entry = os.path.join(exp, name), entries.get(name)
        if entry and entry["status"] == "running" and not live:
            entry = {**entry, "status": "interrupted"}  # its sweep was killed; a rerun resumes it
        values = {k: entry["values"][k] if entry and k in entry["values"] else (h or {}).get(k) for k in keys}
        records = records_of(folder)
        rows.append({"run": name, **values, **summarize(folder, records, h, entry)})
        curves[name] = [r for r in records if r["split"] == "val"]
    return keys, rows, curves


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows ordered by `key` (best first), rows without a value last; the first row with one is marked best."""
    have = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    have.sort(key=lambda r: r[key] if not isinstance(r[key], (dict, list)) else json.dumps(r[key]),
              reverse=key in HIGHER_IS_BETTER)
    out = [{"best": "*" if i == 0 else "", **r} for i, r in enumerate(have)]
    return out + [{"best": "", **r} for r in missing]


def columns(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    shown = [c for c in METRIC_COLUMNS if c not in OPTIONAL or any(r.get(c) is not None for r in rows)]
    return ["best", "run", *keys, *shown]


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if 1000 <= abs(value) < 1e7 else f"{value:.4g}"  # tokens/s in full
    return value if isinstance(value, str) else json.dumps(value)


def markdown(exp: str, cols: list[str], rows: list[dict[str, Any]], sort: str) -> str:
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"# {os.path.basename(os.path.abspath(exp))}: {len(rows)} runs "
             f"({', '.join(f'{n} {s}' for s, n in counts.items())}), sorted by {sort}, * = best", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def label(row: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={cell(row[k])}" for k in keys) or row["run"]


def plot(path: str, keys: list[str], rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]],
         metric: str) -> str | None:
    """results.png: val loss (and answer accuracy) curves of every run, then `metric` against each swept key.
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("loss", "val loss (per token)")]
    if any("answer_acc" in r for c in curves.values() for r in c):
        panels.append(("answer_acc", "val answer accuracy"))
    n = len(panels) + len(keys)
    ncols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / ncols), ncols, figsize=(5.5 * ncols, 4 * math.ceil(n / ncols)),
                             squeeze=False)
    axes = list(axes.flat)
    for ax, (field, title) in zip(axes, panels):
        for row in rows:
            pts = [r for r in curves[row["run"]] if field in r]
            if pts:
                ax.plot([r["step"] for r in pts], [r[field] for r in pts], "o-", ms=3, label=label(row, keys))
        ax.set(xlabel="optimizer step", ylabel=title)
        if ax.lines and len(rows) <= 20:
            ax.legend(fontsize="x-small")
    for ax, key in zip(axes[len(panels):], keys):
        pts = [(r[key], r[metric]) for r in rows if r.get(metric) is not None]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts)
        if not numeric:
            ticks = sorted({cell(x) for x, _ in pts})
            pts = [(ticks.index(cell(x)), y) for x, y in pts]
            ax.set_xticks(range(len(ticks)), ticks, rotation=30, fontsize="small")
        elif pts and min(x for x, _ in pts) > 0 and max(x for x, _ in pts) >= 100 * min(x for x, _ in pts):
            ax.set_xscale("log")  # learning rates, sizes
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o")
        ax.set(xlabel=key, ylabel=f"final {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    write_local_atomic(path, lambda f: f.write(buf.getvalue()))
    return path


def write_results(exp: str, sort: str = "val_loss") -> tuple[str, list[str]]:
    """Write results.csv, results.md and results.png; returns (the markdown table, the paths written)."""
    if not os.path.isdir(exp):
        raise ConfigError(f"{exp}: no such experiment folder")
    keys, rows, curves = collect(exp)
    if not rows:
        raise ConfigError(f"{exp}: no runs (no sweep.json, no folder with a hyperparams.json)")
    if sort not in METRIC_COLUMNS and sort not in keys:
        raise ConfigError(f"--sort {sort!r}: not a column; one of {[*METRIC_COLUMNS, *keys]}")
    rows = sort_rows(rows, sort)
    cols = columns(keys, rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: "" if r.get(c) is None else r[c] if isinstance(r[c], (str, int, float)) else json.dumps(r[c])
                      for c in cols} for r in rows)
    table = markdown(exp, cols, rows, sort)
    paths = [os.path.join(exp, CSV), os.path.join(exp, MD)]
    write_local_atomic(paths[0], lambda f: f.write(out.getvalue().encode()))
    write_local_atomic(paths[1], lambda f: f.write(table.encode()))
    metric = sort if sort in METRIC_COLUMNS and sort not in ("status", "error") else "val_loss"
    png = plot(os.path.join(exp, PNG), keys, rows, curves, metric)
    return table, paths + ([png] if png else [])


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("exp_folder", help="save_root/exp_name: a sweep's folder or one of plain runs")
    ap.add_argument("--sort", default="val_loss", help="the column to sort by (default val_loss)")
    args = ap.parse_args(argv)
    try:
        table, paths = write_results(args.exp_folder, args.sort)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table + "wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
