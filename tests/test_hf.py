"""model_type hf: transformers causal LMs behind the trainer's interface, loading, vocab resizing, KV-cache
decoding, model_parallel (device_map) and end-to-end training with blotching."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from train import checkpoint
from train.config import Config, ConfigError
from train.generate import generate
from train.build import build_model
from train.runlog import read_metrics

LLAMA = {"model_type": "hf", "hf_model": "llama",
         "hf_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2}}
GPT2 = {"model_type": "hf", "hf_model": "gpt2", "hf_config": {"n_layer": 2, "n_embd": 32, "n_head": 4}}
V, W = 23, 20


def hf(kind: dict, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(Config(**{**kind, **kw}), V, W).eval()


@pytest.mark.parametrize("kind", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_positions_with_gaps_are_one_sequence(kind):
    """Positions that jump (an excised step with pad_pos_skip false, a level token before the window's columns)
    do not start a new sequence: training's logits equal those with an explicit mask and those of decoding.
    Without a mask, transformers reads each jump as a packed-sequence boundary."""
    m = hf(kind)
    ids = torch.randint(1, V, (2, 8))
    pos = torch.tensor([[0, 1, 2, 6, 7, 8, 9, 10], [0, 5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones(2, 8, dtype=torch.bool)
    explicit = m.model(input_ids=ids, position_ids=pos, attention_mask=mask.long(), use_cache=False).logits
    torch.testing.assert_close(m(ids, pos, mask), explicit)
    torch.testing.assert_close(m.decode(ids, pos, mask)[0], explicit)


@pytest.mark.parametrize("kind", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_positions_mask_and_padding(kind):
    m = hf(kind)
    assert m.model.config.vocab_size == V and m.model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, V, (3, 10))
    pos = torch.arange(10).expand(3, 10)
    out = m(ids, pos, torch.ones(3, 10, dtype=torch.bool))
    assert out.shape == (3, 10, V)
    # excised tokens leave gaps in the positions, and the model sees them
    assert not torch.allclose(m(ids, pos + torch.arange(10) // 3, torch.ones(3, 10, dtype=torch.bool)), out)
    # right padding (what blotching's compaction leaves) changes nothing on real tokens; empty rows stay finite
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    mask = torch.arange(14) < 10
    mask = mask.expand(3, 14).clone()
    mask[2] = False
    pout = m(padded, torch.arange(14).expand(3, 14), mask)
    assert torch.isfinite(pout).all()
    torch.testing.assert_close(pout[:2, :10], out[:2], rtol=1e-4, atol=1e-5)
    # a mask that is not a compacted prefix is applied: a hole hides that key, left padding hides the pads
    holed = torch.ones(3, 10, dtype=torch.bool)
    holed[:, 3] = False
    assert not torch.allclose(m(ids, pos, holed)[:, 5], out[:, 5])
    left = torch.cat([torch.zeros(3, 4, dtype=torch.long), ids], 1)
    lmask = torch.cat([torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 10, dtype=torch.bool)], 1)
    lpos = torch.cat([torch.zeros(3, 4, dtype=torch.long), pos], 1)
    torch.testing.assert_close(m(left, lpos, lmask)[:, 4:], out, rtol=1e-4, atol=1e-5)


def naive_greedy(m, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        t = torch.tensor([seq])
        seq.append(int(m(t, torch.arange(len(seq))[None], torch.ones_like(t, dtype=torch.bool))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kind", [LLAMA, GPT2, {"d_model": 32, "n_heads": 4, "n_layers": 2, "drop_p": 0.0}],
                         ids=["llama", "gpt2", "transformer"])
def test_kv_cache_greedy_matches_recomputation(kind):
    """Left-padded prompts of different lengths, decoded in one batch with the cache, give each prompt's own
    greedy continuation recomputed from scratch."""
    m = hf(kind)
    prompts = [[3, 4, 5, 6, 7], [9, 2], [1, 1, 8, 3]]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    out = generate(m, ids, mask, 6, stop_id=-1, pad_id=0)
    for row, p in zip(out.tolist(), prompts):
        assert row == naive_greedy(m, p, 6)


def test_stop_token_pads_the_rest():
    m = hf(LLAMA)
    ids = torch.tensor([[3, 4, 5]])
    free = naive_greedy(m, [3, 4, 5], 6)
    stop = free[2]
    out = generate(m, ids, torch.ones_like(ids, dtype=torch.bool), 6, stop_id=stop, pad_id=0)[0].tolist()
    first = free.index(stop)
    assert out == free[: first + 1] + [0] * (5 - first)


def test_pretrained_from_a_local_folder_resizes_vocab(tmp_path):
    src = hf(LLAMA)
    src.model.save_pretrained(tmp_path / "llama")
    with pytest.warns(UserWarning, match=f"23 embedding rows resized to the run's vocabulary of 30"):
        m = build_model(Config(model_type="hf", hf_model=str(tmp_path / "llama"), pretrained=True,
                               hf_config={"attention_dropout": 0.25}), 30, W)
    assert m.model.config.attention_dropout == 0.25  # hf_config applies to pretrained models too
    emb = m.model.get_input_embeddings().weight
    assert emb.shape[0] == 30 and m.model.config.vocab_size == 30
    torch.testing.assert_close(emb[:V], src.model.get_input_embeddings().weight)
    same = build_model(Config(model_type="hf", hf_model=str(tmp_path / "llama"), pretrained=True), V, W).eval()
    ids = torch.randint(0, V, (2, 7))
    args = (ids, torch.arange(7).expand(2, 7), torch.ones(2, 7, dtype=torch.bool))
    torch.testing.assert_close(same(*args), src(*args))


@pytest.mark.parametrize("overrides, message", [
    ({"hf_config": {"n_layers": 2}}, "config key 'hf_config': GPT2Config has no attribute 'n_layers'"),
    ({"hf_config": {"vocab_size": 50257}}, "config key 'hf_config': vocab_size comes from the dataset"),
    ({"hf_config": {"n_positions": 8}}, "config key 'hf_config': gpt2 has 8 positions, fewer than the 20 tokens of a row"),
    ({"hf_model": "/nonexistent/model.gguf"}, "config key 'hf_model': /nonexistent/model.gguf not found"),
])
def test_hf_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_model(Config(**{**GPT2, **overrides}), V, W)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    ({**LLAMA, "model_parallel": True, "multi_gpu": True},
     "config keys 'model_parallel' and 'multi_gpu' do not combine"),
    ({"model_parallel": True}, "config key 'model_parallel': needs model_type hf or compressor, not 'transformer'"),
    ({"model_type": "hf"}, "config key 'hf_model': model_type hf needs"),
    ({**LLAMA, "max_memory": {"cpu": "1GB"}}, "config key 'max_memory': only used with model_parallel true"),
])
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError) as e:
        Config(**overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_model_parallel_without_accelerate_is_a_config_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ConfigError, match="config key 'model_parallel': needs the accelerate package"):
        hf({**LLAMA, "model_parallel": True})


def test_device_map_spill_refuses_training_but_evaluation_shards_a_loaded_model():
    """model_parallel with a memory cap too small for the model: training refuses the map (offloaded weights
    could not be updated); `python -m train.eval` builds the model on the CPU, loads the checkpoint, then shards
    it with layers offloaded to disk, and the outputs do not change."""
    from train.parallel import place

    kind = {**LLAMA, "hf_config": {**LLAMA["hf_config"], "num_hidden_layers": 4}, "model_parallel": True}
    whole = hf(kind)  # no cap: every layer on the CPU
    assert set(whole.model.hf_device_map.values()) == {"cpu"}
    cap = {"cpu": "100KB"}
    with pytest.raises(ConfigError, match="config key 'max_memory': the device map offloads"):
        build_model(Config(**kind, max_memory=cap), V, W)
    ids = torch.randint(0, V, (2, 9))
    args = (ids, torch.arange(9).expand(2, 9), torch.ones(2, 9, dtype=torch.bool))
    torch.manual_seed(1)
    other = build_model(Config(**{**kind, "model_parallel": False}), V, W).eval()
    assert not torch.allclose(other(*args), whole(*args))
    other.load_state_dict(whole.state_dict())
    sharded = place(other, Config(**kind, max_memory=cap))
    assert "disk" in sharded.model.hf_device_map.values()
    torch.testing.assert_close(sharded(*args), whole(*args))


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> str:
    from tests.conftest import arithmetic_root

    return arithmetic_root(tmp_path_factory, train=200, val=32)


def run(arith: str, tmp_path, **kw) -> tuple[str, list[dict]]:
    from train.loop import train

    cfg = Config(**{**dict(data_root=arith, dataset="arith", save_root=str(tmp_path / "runs"), device="cpu",
                           log_mod=2, batch_size=8, val_batch_size=16, max_val_loops=1, n_train_loops=6, n_epochs=1,
                           lr=1e-2, gen_val_samples=16), **kw})
    folder = checkpoint.new_run_folder(cfg.save_root, cfg.exp_name)
    train(cfg, folder)
    return folder, read_metrics(folder)


def test_trains_with_blotching_and_model_parallel_changes_nothing_on_cpu(arith, tmp_path):
    """An hf model trains end to end on blotched batches; with model_parallel (device_map auto, here all on the
    CPU) the run is the same, number for number."""
    folder, rows = run(arith, tmp_path, exp_name="plain", blotch_p=0.5, **LLAMA)
    train_rows = [r for r in rows if r["split"] == "train"]
    val = rows[-1]
    assert val["split"] == "val" and train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert all(r["blotch_frac"] > 0.05 for r in train_rows)
    assert {"gen_acc", "answer_acc", "gen_steps", "ref_steps"} <= set(val) and val["gen_samples"] == 16
    assert 0 <= val["answer_acc"] <= 1 and val["ref_steps"] > 1
    _, par = run(arith, tmp_path, exp_name="par", blotch_p=0.5, model_parallel=True, **LLAMA)
    for a, b in zip(rows, par):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {k: v for k, v in b.items() if k != "tokens_per_s"}
    saved = json.load(open(os.path.join(folder, "hyperparams.json")))
    assert saved["hf_config"] == LLAMA["hf_config"]


def test_eval_cli_report_matches_the_loop(arith, tmp_path):
    """`python -m train.eval SAVE_FOLDER` recomputes the last validation exactly and writes the JSON report."""
    import subprocess
    import sys

    folder, rows = run(arith, tmp_path, exp_name="cli", **LLAMA)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "train.eval", folder, "--gen_samples", "16"], cwd=root,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert p.returncode == 0, p.stderr
    report = json.load(open(os.path.join(folder, "eval_val_step6.json")))
    val = rows[-1]
    for key in ("loss", "acc"):
        assert report[key] == pytest.approx(val[key], rel=1e-6), key
    (greedy,) = report["results"]  # the lowest level, temperature 0: what validation decodes
    assert greedy["temperature"] == 0 and greedy["samples"] == val["gen_samples"] == 16
    for key in ("gen_acc", "answer_acc", "gen_steps", "ref_steps"):
        assert greedy[key] == pytest.approx(val[key], rel=1e-6), key
    assert report["split"] == "val" and report["step"] == 6
    bad = subprocess.run([sys.executable, "-m", "train.eval", folder, "--blotch_level", "0.5"], cwd=root,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == ("error: --blotch_level: the run was not trained with "
                                                          "blotch_tokens")


@pytest.mark.parametrize("name", ["arithmetic_hf", "arithmetic_compressor", "openwebtext_hf", "openwebtext_compressor"])
def test_shipped_configs(name):
    """Every shipped hf/compressor config is valid; those built from a config (no download) build."""
    from train.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   f"{name}.json"))
    assert cfg.model_type == name.split("_")[1]
    if not cfg.pretrained:
        model = build_model(cfg, 18, cfg.cmp_len + cfg.seq_len)
        assert sum(p.numel() for p in model.parameters()) > 1e5


def test_resume_is_exact_with_dropout(arith, tmp_path):
    """A GPT-2 with dropout, stopped after one epoch and resumed, logs what an uninterrupted run logs."""
    from train.loop import train

    kw = dict(GPT2, blotch_p=0.3, lr_schedule="constant", n_train_loops=3)
    _, full = run(arith, tmp_path, exp_name="full", **{**kw, "n_epochs": 2})
    folder, _ = run(arith, tmp_path, exp_name="cut", **kw)
    from train.config import resume_config

    cfg = resume_config(folder, {"n_epochs": 2})
    train(cfg, folder, checkpoint.load(folder))
    resumed = read_metrics(folder)
    assert len(resumed) == len(full) == 6
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {k: v for k, v in b.items() if k != "tokens_per_s"}


@pytest.mark.parametrize("kind", [LLAMA, GPT2, {"d_model": 32, "n_heads": 4, "n_layers": 2, "drop_p": 0.0}],
                         ids=["llama", "gpt2", "transformer"])
def test_greedy_with_padding_inside_the_prompt(kind):
    """A blotch-level token before a left-padded cmp part leaves padding inside the prompt: decoding equals
    decoding the prompt without it."""
    m = hf(kind)
    ids = torch.tensor([[7, 0, 0, 3, 4], [7, 0, 9, 2, 5]])
    mask = torch.tensor([[True, False, False, True, True], [True, False, True, True, True]])
    out = generate(m, ids, mask, 5, stop_id=-1, pad_id=0)
    assert out[0].tolist() == naive_greedy(m, [7, 3, 4], 5) and out[1].tolist() == naive_greedy(m, [7, 9, 2, 5], 5)


def fake_hub(tmp_path, repo: str, config: dict) -> str:
    """A Hugging Face cache folder holding `repo`'s config.json, laid out as a download leaves it: what
    `from_pretrained(repo)` reads offline."""
    folder = tmp_path / "hub" / f"models--{repo}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    return str(tmp_path / "hub")


HUB_GPT2 = {"model_type": "gpt2", "n_layer": 3, "n_embd": 48, "n_head": 4, "n_positions": 1024, "vocab_size": 50257}


def in_subprocess(code: str, hub: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *code], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_pretrained_hub_name_reads_the_hub_config(tmp_path):
    """`hf_model: "gpt2", pretrained: true` is the Hub's gpt2 (its config here), not GPT2Config's defaults."""
    hub = fake_hub(tmp_path, "gpt2", HUB_GPT2)
    p = in_subprocess(["-c", "from train.config import Config\nfrom train.hf_model import hf_config\n"
                             "c = hf_config(Config(model_type='hf', hf_model='gpt2', pretrained=True), None)\n"
                             "print(c.n_layer, c.n_embd)"], hub)
    assert p.returncode == 0 and p.stdout.split() == ["3", "48"], p.stderr
    missing = in_subprocess(["-c", "from train.config import Config\nfrom train.hf_model import hf_config\n"
                                   "hf_config(Config(model_type='hf', hf_model='gpt2-xl', pretrained=True), None)"], hub)
    assert "ConfigError: config key 'hf_model': cannot load 'gpt2-xl'" in missing.stderr


def test_a_level_token_beyond_the_positions_fails_before_the_run(tmp_path, make_dataset):
    """configs/openwebtext_hf.json with blotch_tokens: GPT-2's 1024 positions cannot hold a 1024-token window
    and its level token; `python -m train` says so before any run folder exists (it used to fail at the first
    step, a device assert on GPU)."""
    make_dataset(str(tmp_path / "owt"), {"train": 4, "val": 2}, cmp_len=64, seq_len=960, vocab_size=50257)
    hub = fake_hub(tmp_path, "gpt2", HUB_GPT2)
    args = ["-m", "train", "configs/openwebtext_hf.json", "--data_root", str(tmp_path), "--dataset", "owt",
            "--save_root", str(tmp_path / "runs"), "--multi_gpu", "false", "--device", "cpu"]
    p = in_subprocess([*args, "--blotch_tokens", "true"], hub)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "error: config key 'hf_config': gpt2 has 1024 positions, fewer than the 1025 tokens of a row (the window "
        "and a blotch-level token)")
    assert not os.path.exists(tmp_path / "runs")
