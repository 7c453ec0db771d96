"""Free-running evaluation: final answers, solution steps and lengths, token accuracy, and seeded sampling."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from tests import synthetic
from train.blotch import BlotchSpec, prompt
from train.generate import generate, gumbel_noise
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
    gen = generate(model, *prompt(ids, SPEC, 0), S, EOS, synthetic.PAD)
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
    ref_tokens = sum(len(r) - 1 for r in refs) / len(refs)  # eos excluded
    assert perfect == {"gen_acc": 1.0, "answer_acc": 1.0, "gen_steps": ref_steps, "ref_steps": ref_steps,
                       "gen_tokens": ref_tokens, "ref_tokens": ref_tokens, "len_diff_pct": 0.0, "no_eos": 0.0}
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
    (greedy,) = report["results"]
    assert report["gen_samples"] == 16 and 0 <= greedy["gen_acc"] <= 1 and "gen_steps" not in greedy
    assert report["loss"] == val["loss"]


def test_report_against_a_hand_computed_case():
    """Three problems, scored by hand: a right answer in one step, a wrong answer at full length, and a
    solution that never ends."""
    enc = synthetic.encode
    ids = torch.full((3, C + S), synthetic.PAD)
    for b, (problem, solution) in enumerate([("12+30=", "42"), ("5+6+7=", "11+7=18"), ("1+2=", "3")]):
        ids[b, C - len(problem):C] = torch.tensor(enc(problem))
        ids[b, C:C + len(solution) + 1] = torch.tensor(enc(solution) + [EOS])
    outputs = [enc("42") + [EOS], enc("11+7=19") + [EOS], enc("1+2+0") * 20]
    rec = scored(Scripted(outputs), ids)
    # reference: 2 + 7 + 1 = 10 tokens in 1 + 2 + 1 = 4 steps; generated: 2 + 7 + 32 (the budget, S) tokens
    assert rec["answer_acc"] == 1 / 3
    assert rec["ref_tokens"] == 10 / 3 and rec["gen_tokens"] == (2 + 7 + S) / 3
    assert rec["len_diff_pct"] == pytest.approx(100 * ((2 + 7 + S) / 10 - 1))
    assert rec["ref_steps"] == 4 / 3 and rec["gen_steps"] == (1 + 2 + 1) / 3 and rec["no_eos"] == 1 / 3
    # token accuracy: position by position against each reference continuation, eos included
    want = sum(g == r for g, r in zip(outputs[0], enc("42") + [EOS])) + \
        sum(g == r for g, r in zip(outputs[1], enc("11+7=18") + [EOS])) + \
        sum(g == r for g, r in zip(outputs[2], enc("3") + [EOS]))
    assert rec["gen_acc"] == want / (3 + 8 + 2)


class Fixed(nn.Module):
    """The same logits for every row at every step: sampling from it must follow softmax(logits / T)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def decode(self, input_ids, position_ids, mask, cache=None):
        return self.logits.expand(len(input_ids), input_ids.shape[1], -1).clone(), None


def test_temperature_zero_is_argmax_and_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    model, n = Fixed(logits), 4000
    prompt_ids = torch.ones(n, 1, dtype=torch.long)
    mask = torch.ones(n, 1, dtype=torch.bool)
    greedy = generate(model, prompt_ids, mask, 3, stop_id=-1, pad_id=0)
    assert (greedy == 0).all()
    for t in (0.5, 1.0, 2.0):
        out = generate(model, prompt_ids, mask, 3, stop_id=-1, pad_id=0, temperature=t, seed=1)
        freq = torch.bincount(out.flatten(), minlength=4).double() / out.numel()
        want = torch.softmax(logits.double() / t, 0)
        assert torch.allclose(freq, want, atol=4 * (want * (1 - want) / out.numel()).sqrt().max()), (t, freq, want)


def test_sampling_is_seeded_and_independent_of_batching():
    """The same seed gives the same tokens, whatever the batch a sample is decoded in; another seed differs."""
    torch.manual_seed(0)
    from train.transformer import PositionalEncoding, Transformer

    model = Transformer(synthetic.VOCAB, 16, 2, 2, 1, 0.0, PositionalEncoding(64, 16, 0.0, False, False, 64)).eval()
    ids = torch.from_numpy(synthetic.arithmetic_rows(10, C, S, seed=3).astype("int64"))
    sids = torch.arange(100, 110)

    def sample(rows: slice, seed: int) -> torch.Tensor:
        return generate(model, *prompt(ids[rows], SPEC, 0), 12, EOS, synthetic.PAD, temperature=0.7,
                        sample_ids=sids[rows], seed=seed)

    whole = sample(slice(None), 5)
    assert torch.equal(whole, sample(slice(None), 5))
    assert torch.equal(whole[4:7], sample(slice(4, 7), 5)) and torch.equal(whole[:1], sample(slice(0, 1), 5))
    assert not torch.equal(whole, sample(slice(None), 6))
    noise = gumbel_noise(5, sids, 0, 1000)
    assert noise.shape == (10, 1000) and abs(float(noise.mean()) - 0.5772) < 0.05  # Euler's constant


def test_answer_metrics_only_where_the_data_has_answers(tmp_path):
    """Padding is not a final answer: padded windows whose manifest says they hold none (GLUE pairs, --no_pack
    text) get token accuracy only."""
    from shards import load_manifest, save_manifest, storage
    from tests.conftest import write_dataset
    from train import checkpoint
    from train.config import Config
    from train.loop import train

    write_dataset(str(tmp_path / "pairs"), {"train": 64, "val": 16}, cmp_len=C, seq_len=S, content="arithmetic")
    fs, root = storage.open_fs(str(tmp_path / "pairs"))
    m = load_manifest(fs, root)
    assert m.answers and m.layout == "padded"
    m.answers = False
    save_manifest(fs, root, m)
    cfg = Config(data_root=str(tmp_path), dataset="pairs", device="cpu", save_root=str(tmp_path / "runs"),
                 d_model=16, n_heads=2, n_layers=1, batch_size=8, max_val_loops=1, n_train_loops=1, n_epochs=1,
                 gen_val_samples=8)
    val = train(cfg, checkpoint.new_run_folder(cfg.save_root, cfg.exp_name))
    assert "gen_acc" in val and not {"answer_acc", "gen_steps", "no_eos"} & set(val)
