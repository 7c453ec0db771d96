"""Free-running evaluation: final answers, solution steps and token accuracy, scored with scripted models."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from tests import synthetic
from train.blotch import BlotchSpec, prompt
from train.generate import greedy
from train.scoring import final_answer, n_steps, record, score

C, S = 16, 32
SPEC = BlotchSpec(cmp_len=C, pad_id=synthetic.PAD, eos_id=synthetic.EOS, layout="padded",
                  separator_ids=(synthetic.SEP,))
SEPS, EOS = {synthetic.SEP}, synthetic.EOS


def test_final_answer_and_steps():
    enc = synthetic.encode
    solution = enc("1005+5=1010") + [EOS, 0, 0]
    assert final_answer(solution, SEPS, EOS) == tuple(enc("1010"))
    assert n_steps(solution, SEPS, EOS) == 2
    assert final_answer(enc("1005+5=10"), SEPS, EOS) is None  # no eos: unfinished
    assert n_steps(enc("12") + [EOS], SEPS, EOS) == 1


class Scripted(nn.Module):
    """Emits a fixed continuation per row, whatever it is shown: a stand-in for a trained model."""

    def __init__(self, rows: list[list[int]]):
        super().__init__()
        self.rows = rows

    def decode(self, input_ids, position_ids, mask, cache=None):
        step = 0 if cache is None else cache
        logits = torch.zeros(len(input_ids), input_ids.shape[1], synthetic.VOCAB)
        for b, row in enumerate(self.rows):
            logits[b, -1, row[step] if step < len(row) else EOS] = 1
        return logits, step + 1


def scored(model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Decode greedily from the cmp parts, as validation does, and score against the windows."""
    gen = greedy(model, *prompt(ids, SPEC, 0), S, EOS, synthetic.PAD)
    return record(score(gen, ids, SPEC, True), True)


def solutions(ids: torch.Tensor) -> list[list[int]]:
    out = []
    for row in ids[:, C:].tolist():
        out.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return out


def test_perfect_and_shortcut_models():
    ids = torch.from_numpy(synthetic.arithmetic_rows(8, C, S, seed=2).astype("int64"))
    refs = solutions(ids)
    perfect = scored(Scripted(refs), ids)
    ref_steps = sum(n_steps(r, SEPS, EOS) for r in refs) / len(refs)
    assert perfect == {"gen_acc": 1.0, "answer_acc": 1.0, "gen_steps": ref_steps, "ref_steps": ref_steps}
    assert ref_steps > 1.5
    # the Chain-of-Shortcuts ideal: straight to the answer, every answer right, one step each
    shortcut = [list(final_answer(r, SEPS, EOS)) + [EOS] for r in refs]
    rec = scored(Scripted(shortcut), ids)
    assert rec["answer_acc"] == 1.0 and rec["gen_steps"] == 1.0 and rec["gen_acc"] < 0.5
    # one wrong digit in the first row's answer costs exactly that row
    wrong = [list(r) for r in refs]
    wrong[0][-2] = synthetic.CHARS["0"] if wrong[0][-2] != synthetic.CHARS["0"] else synthetic.CHARS["1"]
    rec = scored(Scripted(wrong), ids)
    assert rec["answer_acc"] == 7 / 8
    n_tokens = sum(len(r) for r in refs)
    assert rec["gen_acc"] == (n_tokens - 1) / n_tokens


def test_text_report_has_token_accuracy_only(tmp_path):
    """Packed text windows have no final answer: the report gives the continuation's token accuracy."""
    from tests.conftest import write_dataset
    from train import checkpoint
    from train.config import Config
    from train.eval import main
    from train.loop import train

    write_dataset(str(tmp_path / "text"), {"train": 64, "val": 16}, cmp_len=4, seq_len=12, vocab_size=50)
    cfg = Config(data_root=str(tmp_path), dataset="text", device="cpu", save_root=str(tmp_path / "runs"),
                 model_type="hf", hf_model="gpt2", hf_config={"n_layer": 1, "n_embd": 16, "n_head": 2},
                 batch_size=8, max_val_loops=1, n_train_loops=2, n_epochs=1, gen_val_samples=8, lr=1e-2)
    folder = checkpoint.new_run_folder(cfg.save_root, cfg.exp_name)
    val = train(cfg, folder)
    assert "gen_acc" in val and "answer_acc" not in val
    assert main([folder, "--gen_samples", "16"]) == 0
    report = json.load(open(os.path.join(folder, "eval_val_step2.json")))
    assert report["gen_samples"] == 16 and 0 <= report["gen_acc"] <= 1 and "gen_steps" not in report
    assert report["loss"] == val["loss"]
