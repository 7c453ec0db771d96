"""What a run leaves for people: metrics.jsonl, training_log.txt, curves.png and decoded examples.

Only rank 0 writes. The log files' lengths are saved in each checkpoint, and a resume cuts the files back to
them, so lines written after the checkpoint a run was killed past are not repeated. A `tracker` (TensorBoard,
W&B: train/tracking.py) gets every metrics record too; it is opened at the first record, whose step tells it
where a resumed run starts again.
"""
from __future__ import annotations

import json
import os
from typing import Any

from train.tracking import open_tracker

METRICS, TEXT_LOG, CURVES = "metrics.jsonl", "training_log.txt", "curves.png"


class RunLog:
    def __init__(self, folder: str, enabled: bool, resume_at: dict[str, int] | None = None, tracker: str = "none"):
        self.folder, self.enabled = folder, enabled
        self.tracker_name, self.tracker = tracker, None
        if enabled and resume_at is not None:
            for name, size in resume_at.items():
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(size)

    def _append(self, name: str, text: str) -> None:
        if self.enabled:
            with open(os.path.join(self.folder, name), "a") as f:
                f.write(text)

    def metrics(self, record: dict[str, Any]) -> None:
        self._append(METRICS, json.dumps(record) + "\n")
        if self.enabled and self.tracker_name != "none":
            if self.tracker is None:
                self.tracker = open_tracker(self.tracker_name, self.folder, first_step=record["step"])
            self.tracker.log(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def text(self, line: str, echo: bool = True) -> None:
        if self.enabled and echo:
            print(line, flush=True)
        self._append(TEXT_LOG, line + "\n")

    def positions(self) -> dict[str, int]:
        """Byte sizes of the log files now, for the checkpoint."""
        sizes = {}
        for name in (METRICS, TEXT_LOG):
            path = os.path.join(self.folder, name)
            sizes[name] = os.path.getsize(path) if os.path.exists(path) else 0
        return sizes


def read_metrics(folder: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line still being written (no newline yet) by a live run is left out."""
    with open(os.path.join(folder, METRICS)) as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def plot_curves(folder: str) -> str | None:
    """curves.png: train and val loss and token accuracy against steps, and where the data has answers the
    greedy answer accuracy and solution steps of each validation (what matters); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(folder)
    val = [r for r in rows if r["split"] == "val"]
    answers = any("answer_acc" in r for r in val)
    fig, axes = plt.subplots(1, 4 if answers else 2, figsize=(20 if answers else 10, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [r for r in rows if r["split"] == split]
        for ax, key in zip(axes, ("loss", "acc")):
            ax.plot([r["step"] for r in pts], [r[key] for r in pts], style, label=split)
    labels = ["loss (per token)", "token accuracy (teacher-forced)"]
    if answers:
        pts = [r for r in val if "answer_acc" in r]
        steps = [r["step"] for r in pts]
        axes[2].plot(steps, [r["answer_acc"] for r in pts], "o-", color="C2", label="val, greedy")
        axes[2].set_ylim(-0.02, 1.02)
        axes[3].plot(steps, [r["gen_steps"] for r in pts], "o-", color="C3", label="generated")
        axes[3].plot(steps, [r["ref_steps"] for r in pts], "--", color="gray", label="reference")
        labels += ["answer accuracy", "solution steps"]
    for ax, label in zip(axes, labels):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(folder, CURVES)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def describe(rec: dict[str, Any]) -> str:
    """The free-running part of a val record as one log line ('' when there is none)."""
    keys = [k for k in ("gen_acc", "answer_acc", "gen_steps", "ref_steps") if k in rec]
    keys += sorted(k for k in rec if k.endswith(("ctx_loss", "ctx_acc")))
    return ", ".join(f"{k} {rec[k]:.4f}" for k in keys)


def decode(tokenizer, ids: list[int]) -> str:
    """Text with the dataset's tokenizer, or the ids themselves when the dataset has none."""
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))


def render_example(tokenizer, ids: list[int], valid: list[bool], blotched: list[bool], cmp_len: int) -> str:
    """The window's real tokens, ` ‖ ` after the compression part, the training view's blotched spans in ⟦ ⟧."""
    groups: list[tuple[tuple[bool, bool], list[int]]] = []
    for j, (t, v, b) in enumerate(zip(ids, valid, blotched)):
        key = (j >= cmp_len, b)
        if v and groups and groups[-1][0] == key:
            groups[-1][1].append(t)
        elif v:
            groups.append((key, [t]))
    text, in_seq = "", False
    for (seq, hidden), toks in groups:
        if seq and not in_seq:
            text, in_seq = text + " ‖ ", True
        part = decode(tokenizer, toks)
        text += f"⟦{part}⟧" if hidden else part
    return text
