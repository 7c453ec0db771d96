"""Blotch-intensity tokens (Chain of Shortcuts): per-sample levels, the leading token, evaluation at a level."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from tests import synthetic
from train.blotch import IGNORE, BlotchSpec, blotch
from train.config import Config, ConfigError
from train.data import blotch_levels

C, S = 16, 32
LEVELS = (0.0, 0.5, 1.0)
SPEC = BlotchSpec(cmp_len=C, pad_id=synthetic.PAD, eos_id=synthetic.EOS, layout="padded",
                  separator_ids=(synthetic.SEP,), seed=5, levels=LEVELS, level_token0=synthetic.VOCAB)


def test_levels_from_config():
    assert blotch_levels(Config()) == ()
    assert blotch_levels(Config(blotch_tokens=True, n_btokens=3, blotch_p_min=0.2, blotch_p_max=0.6)) == \
        pytest.approx((0.2, 0.4, 0.6))
    with pytest.raises(ConfigError, match="config key 'blotch_p_min': 0.7 exceeds blotch_p_max 0.6"):
        Config(blotch_tokens=True, blotch_p_min=0.7, blotch_p_max=0.6)


@pytest.mark.parametrize("spacing", ["random", "equal"])
def test_each_row_is_blotched_at_its_level_and_led_by_its_token(spacing):
    spec = dataclasses.replace(SPEC, spacing=spacing)
    ids = torch.from_numpy(synthetic.arithmetic_rows(64, C, S, seed=4, max_terms=6).astype("int64"))
    sids = torch.arange(100, 164)
    v = blotch(ids, sids, 2, spec)
    level = v.input_ids[:, 0] - synthetic.VOCAB
    assert set(level.tolist()) == {0, 1, 2}
    assert (v.targets[:, 0] == IGNORE).all() and (v.position_ids[:, 0] == 0).all() and v.mask[:, 0].all()
    assert torch.equal(blotch(ids[10:20], sids[10:20], 2, spec).input_ids[:, 0], v.input_ids[10:20, 0])  # per sample
    assert not v.blotched[level == 0].any() and v.blotched[level == 2].any()
    for i, p in enumerate(LEVELS):  # the rest of a row is exactly plain blotching at its level's rate
        rows = level == i
        plain = blotch(ids[rows], sids[rows], 2, dataclasses.replace(spec, levels=(), blotch_p=p))
        T = plain.input_ids.shape[1]
        assert torch.equal(v.input_ids[rows, 1:T + 1], plain.input_ids)
        assert torch.equal(v.targets[rows, 1:T + 1], plain.targets)
        assert torch.equal(v.position_ids[rows, 1:T + 1], plain.position_ids + 1)
        assert torch.equal(v.blotched[rows], plain.blotched)
    ask = blotch(ids, sids, 0, spec, train=False, level=2)  # evaluation asks for a level
    assert (ask.input_ids[:, 0] == synthetic.VOCAB + 2).all() and ask.blotched.any()
    assert not blotch(ids, sids, 0, spec, train=False).blotched.any()  # the lowest level by default


def test_validation_is_never_blotched_even_when_the_lowest_level_blotches():
    """With blotch_p_min > 0, evaluation reads whole windows led by the lowest level's token, unless a level is
    asked for explicitly."""
    spec = dataclasses.replace(SPEC, levels=(0.5, 1.0))
    ids = torch.from_numpy(synthetic.arithmetic_rows(32, C, S, seed=4, max_terms=6).astype("int64"))
    sids = torch.arange(32)
    v = blotch(ids, sids, 0, spec, train=False)
    assert not v.blotched.any() and (v.input_ids[:, 0] == synthetic.VOCAB).all()
    assert blotch(ids, sids, 0, spec, train=False, level=0).blotched.any()


def test_trains_and_evaluates_at_a_level(tmp_path):
    from tests.conftest import write_dataset
    from train import checkpoint
    from train.loop import train

    write_dataset(str(tmp_path / "arith"), {"train": 200, "val": 32}, cmp_len=C, seq_len=S, content="arithmetic",
                  samples_per_shard=100)
    cfg = Config(data_root=str(tmp_path), dataset="arith", device="cpu", save_root=str(tmp_path / "runs"),
                 d_model=32, n_heads=4, n_layers=1, drop_p=0.0, batch_size=8, val_batch_size=16, max_val_loops=1,
                 n_train_loops=6, n_epochs=1, gen_val_samples=8, blotch_tokens=True, n_btokens=3)
    folder = checkpoint.new_run_folder(cfg.save_root, cfg.exp_name)
    train(cfg, folder)
    assert checkpoint.load(folder)["model"]["embed.weight"].shape[0] == synthetic.VOCAB + 3
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    p = subprocess.run([sys.executable, "-m", "train.eval", folder, "--blotch_level", "all", "--temperature", "0",
                        "0.7", "--gen_samples", "12", "--batch_size", "5"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    report = json.load(open(os.path.join(folder, "eval_val_step6.json")))
    grid = [(r["blotch_level"], r["temperature"]) for r in report["results"]]
    assert grid == [(level, t) for level in (0.0, 0.5, 1.0) for t in (0.0, 0.7)] and "loss" in report
    assert all(r["samples"] == 12 and {"gen_steps", "answer_acc", "len_diff_pct", "no_eos"} <= set(r)
               for r in report["results"])
    assert "| 0.50 | 0.7 |" in p.stdout  # the printed table
    p = subprocess.run([sys.executable, "-m", "train.eval", folder, "--blotch_level", "0.3"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == "error: --blotch_level: 0.3 is not one of the run's levels " \
                                                     "[0.0, 0.5, 1.0]"
