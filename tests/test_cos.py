"""experiments/cos.py (`make cos`): the results table and the paper's targets against hand-computed numbers, and
the whole command end to end on a tiny config (preprocess, sweep, evaluation, table, figure; a rerun redoes
nothing)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.test_train import ROOT, TINY

spec = importlib.util.spec_from_file_location("cos", os.path.join(ROOT, "experiments", "cos.py"))
cos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cos)


def result(acc: float, steps: float, len_diff: float = 0.0) -> dict[str, list[float]]:
    return {"answer_acc": [acc], "gen_steps": [steps], "len_diff_pct": [len_diff], "ref_steps": [6.0],
            "no_eos": [0.0]}


def rows(**levels_acc: tuple[float, float]) -> dict:
    """Vanilla 0.92 / 0.20 (T 0 / 0.7) in 6 steps, Direct 0.50 in 1 step, CoS levels as given."""
    out = {("Vanilla", None): {0.0: result(0.92, 6.0), 0.7: result(0.20, 6.0)},
           ("Direct", None): {0.0: result(0.50, 1.0, -80.0), 0.7: result(0.48, 1.0, -80.0)}}
    for level, (acc, steps) in levels_acc.items():
        lv = float(level.removeprefix("l")) / 10
        out[("CoS", lv)] = {0.0: result(acc, steps), 0.7: result(acc - 0.3 * steps / 6, steps)}
    return out


def test_targets_hand_computed():
    # lowest level 0.90 (within 5 of 0.92); level 0.5: 0.86 in 3 steps = 50 % fewer, within 5 of 0.90;
    # at T=0.7 (accuracy - 0.3 x steps / 6) the best CoS level is 0.5: 0.86 - 0.15 = 0.71 >= 0.20 + 0.10
    lines = cos.targets(rows(l0=(0.90, 6.0), l5=(0.86, 3.0), l10=(0.60, 1.0)))
    assert lines == [
        "- [x] T=0: Vanilla >= 90 % (measured 92.0 %)",
        "- [x] T=0: CoS at its lowest level within 5 points of Vanilla (90.0 vs 92.0)",
        "- [x] T=0: a CoS level with >= 40 % fewer generated steps within 5 points of CoS's lowest (the shortest "
        "within 5 points: level 0.50, 86.0 % in 3.00 steps vs 6.00)",
        "- [x] T=0: Direct >= 15 points below Vanilla (50.0 vs 92.0)",
        "- [x] T=0.7: the best CoS level >= Vanilla + 10 points (71.0 vs 20.0)"]
    # the only level within 5 points saves 1 step in 6 (17 %): that target fails, and names what it found
    lines = cos.targets(rows(l0=(0.80, 6.0), l5=(0.78, 5.0), l10=(0.30, 1.0)))
    assert lines[1].startswith("- [ ] T=0: CoS at its lowest level within 5 points of Vanilla (80.0 vs 92.0)")
    assert lines[2].startswith("- [ ] ") and "level 0.50, 78.0 % in 5.00 steps vs 6.00" in lines[2]


def test_table_means_and_spread_over_seeds():
    two_seeds = {("Vanilla", None): {0.0: {"answer_acc": [0.9, 0.8], "len_diff_pct": [0.0, 2.0],
                                          "gen_steps": [6.0, 6.0], "ref_steps": [6.0, 6.0], "no_eos": [0.0, 0.1]}}}
    lines = cos.table(two_seeds, [0.0])
    assert lines[0] == "| condition | acc T=0 | Len Diff % (T=0) | steps (T=0) | no eos (T=0) |"
    assert lines[2] == "| Vanilla | 85.0 ± 7.1 | +1 | 6.00 | 5.0 |"  # stdev of 90 and 80: 7.07


@pytest.mark.slow
def test_make_cos_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cfg = {**TINY, "exp_name": "cos_tiny", "save_root": str(tmp_path / "runs"), "data_root": str(tmp_path / "data"),
           "dataset": "arithmetic", "name": "cos_tiny", "n_train": 300, "n_val": 40, "max_num": 20, "min_ents": 2,
           "max_ents": 2, "cmp_len": 12, "seq_len": 88, "n_epochs": 1, "n_train_loops": 3, "batch_size": 16,
           "gen_val_samples": 4, "n_btokens": 3, "blotch_p_min": 0.0, "blotch_p_max": 1.0,
           "blotch_spacing": "equal"}
    (tmp_path / "base.json").write_text(json.dumps(cfg))
    (tmp_path / "runs.json").write_text(json.dumps(
        {"combos": {"blotch_p": [0.0, 0.0, 1.0], "blotch_tokens": [False, True, False]}}))
    args = ["--config", str(tmp_path / "base.json"), "--ranges", str(tmp_path / "runs.json"),
            "--temperatures", "0", "0.7", "--gen_samples", "6", "--jobs", "1"]
    assert cos.main(args) == 0

    exp = tmp_path / "runs" / "cos_tiny"
    text = (exp / "cos_results.md").read_text()
    names = [line.split(" | ")[0].removeprefix("| ") for line in text.splitlines() if line.startswith("| ")]
    assert names == ["condition", "Vanilla", "CoS 0.00", "CoS 0.50", "CoS 1.00", "Direct"]
    assert (exp / "cos.png").stat().st_size > 0
    # every cell is its run's eval report: Direct's accuracy at T=0.7, and the CoS run's level 0.5 steps at T=0
    folders = {cos.condition(json.load(open(exp / f / "hyperparams.json"))): exp / f
               for f in os.listdir(exp) if (exp / f / "hyperparams.json").exists()}
    assert sorted(folders) == ["CoS", "Direct", "Vanilla"]

    def report(cond: str) -> list[dict]:
        (path,) = [p for p in os.listdir(folders[cond]) if p.startswith("eval_val_step")]
        return json.load(open(folders[cond] / path))["results"]

    direct = {r["temperature"]: f"{100 * r['answer_acc']:.1f}" for r in report("Direct")}
    assert f"| Direct | {direct[0.0]} | {direct[0.7]} | " in text
    mid = next(r for r in report("CoS") if r["temperature"] == 0.0 and r["blotch_level"] == 0.5)
    assert f"| {mid['gen_steps']:.2f} |" in next(line for line in text.splitlines() if line.startswith("| CoS 0.50"))
    assert len(report("CoS")) == 3 * 2 and len(report("Vanilla")) == 2  # levels x temperatures

    # the same command again: the sweep starts nothing and no evaluation is recomputed
    stamps = {p: os.stat(p).st_mtime_ns for f in folders.values() for p in f.iterdir()}
    assert cos.main(args) == 0
    assert {p: os.stat(p).st_mtime_ns for f in folders.values() for p in f.iterdir()} == stamps
