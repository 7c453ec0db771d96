"""model_type compressor: the batch layout, attended compression vectors, frozen base, cached decoding, training."""
from __future__ import annotations

import pytest
import torch

from tests import synthetic
from train.blotch import IGNORE, BlotchSpec, blotch
from train.compressor import Compressor, layer_index
from train.config import Config, ConfigError
from train.generate import generate
from train.build import build_model

C, S = 16, 32
LLAMA = {"model_type": "compressor", "hf_model": "llama", "cmp_len": C, "n_cmps": 2,
         "hf_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2}}
SPEC = BlotchSpec(cmp_len=C, pad_id=synthetic.PAD, eos_id=synthetic.EOS, layout="padded",
                  separator_ids=(synthetic.SEP,), blotch_p=0.5, seed=3)


def compressor(**kw) -> Compressor:
    torch.manual_seed(0)
    return build_model(Config(**{**LLAMA, **kw}), synthetic.VOCAB, C + S)


def windows(n: int = 6) -> torch.Tensor:
    return torch.from_numpy(synthetic.arithmetic_rows(n, C, S, seed=1).astype("int64"))


@pytest.mark.parametrize("rmb_task, rmb_only, pad_pos_skip", [(False, False, True), (True, False, False),
                                                              (False, True, True)])
def test_view_matches_a_plain_reference(rmb_task, rmb_only, pad_pos_skip):
    m = compressor(rmb_task=rmb_task, rmb_only=rmb_only, pad_pos_skip=pad_pos_skip)
    ids = windows()
    spec = BlotchSpec(**{**SPEC.__dict__, "pad_pos_skip": pad_pos_skip})
    v = blotch(ids, torch.arange(len(ids)), 0, spec)
    assert v.blotched.any()
    w = m.view(v)
    for b in range(len(ids)):
        row, keep = ids[b].tolist(), (v.valid[b] & ~v.blotched[b]).tolist()
        cmp = [t for j, t in enumerate(row[:C]) if keep[j]]
        cont_cols = [j for j in range(C, C + S) if keep[j]]
        cont = [row[j] for j in cont_cols]
        assert w.input_ids[b, :len(cmp)].tolist() == cmp and not w.mask[b, len(cmp):C].any()
        n = len(cont)
        assert w.input_ids[b, C:C + n].tolist() == cont and w.mask[b, C:C + n].all() and not w.mask[b, C + n:].any()
        assert w.position_ids[b, :len(cmp)].tolist() == list(range(len(cmp)))
        want_pos = list(range(n)) if pad_pos_skip else [j - C for j in cont_cols]
        assert w.position_ids[b, C:C + n].tolist() == want_pos
        t_cmp = cmp if rmb_task or rmb_only else [IGNORE] * len(cmp)
        t_cont = [IGNORE] * n if rmb_only else cont
        assert w.targets[b, :len(cmp)].tolist() == t_cmp and w.targets[b, C:C + n].tolist() == t_cont
        assert (w.targets[b, len(cmp):C] == IGNORE).all() and (w.targets[b, C + n:] == IGNORE).all()


def test_context_flows_only_through_the_attended_vectors():
    """The continuation's logits depend on the cmp tokens (the appended vectors are attended, unlike the
    original's bug B22), and only through the compressed vectors."""
    m = compressor().eval()
    w = m.view(blotch(windows(), torch.arange(6), 0, SPEC, train=False))
    out = m(w.input_ids, w.position_ids, w.mask)
    changed = w.input_ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % synthetic.VOCAB
    cont = slice(C, None)
    assert not torch.allclose(m(changed, w.position_ids, w.mask)[:, cont], out[:, cont])
    cmpr = m.compress(w.input_ids[:, :C], w.mask[:, :C])
    direct = m._decode_task(cmpr, m.sos, w.input_ids[:, cont], w.mask[:, cont], w.position_ids[:, cont])
    torch.testing.assert_close(direct, out[:, cont])
    assert (out[:, :C] == 0).all()  # no rmb_task: the cmp part is not predicted


@pytest.mark.parametrize("train_base", [False, True])
def test_base_frozen_unless_train_base(train_base):
    m = compressor(train_base=train_base, proj_cmpr=True, proj_hid_mult=2)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    w = m.view(blotch(windows(), torch.arange(6), 0, SPEC))
    logits = m(w.input_ids, w.position_ids, w.mask)
    keep = w.targets != IGNORE
    torch.nn.functional.cross_entropy(logits[keep], w.targets[keep]).backward()
    opt.step()
    moved = {k for k, p in m.named_parameters() if not torch.equal(p, before[k])}
    assert {"embs", "proj.0.weight", "proj.2.weight"} <= moved
    assert any(k.startswith("base.") for k in moved) == train_base


def naive_greedy(m: Compressor, cmp: list[int], n: int) -> list[int]:
    ids = torch.tensor([cmp + [0] * (C - len(cmp))])
    cmask = torch.tensor([[True] * len(cmp) + [False] * (C - len(cmp))])
    out: list[int] = []
    for _ in range(n):
        cont = torch.tensor([out + [0]])
        x = torch.cat([ids, cont], 1)
        mask = torch.cat([cmask, torch.ones_like(cont, dtype=torch.bool)], 1)
        pos = torch.cat([torch.arange(C), torch.arange(cont.shape[1])])[None]
        out.append(int(m(x, pos, mask)[0, C + len(out)].argmax()))
    return out


def test_cached_decoding_matches_recomputation():
    m = compressor(proj_cmpr=True).eval()
    ids = windows(3)[:, :C]
    mask = ids != synthetic.PAD
    out = generate(m, ids, mask, 5, stop_id=-1, pad_id=0)
    for b in range(3):
        cmp = [t for t, k in zip(ids[b].tolist(), mask[b].tolist()) if k]
        assert out[b].tolist() == naive_greedy(m, cmp, 5)


def test_cmp_layer():
    assert [layer_index(x, 4) for x in ("half", "last", 0, -1, -2)] == [2, 4, 0, 4, 3]
    with pytest.raises(ConfigError, match="config key 'cmp_layer': 5 is outside the hidden states 0..4"):
        layer_index(5, 4)
    with pytest.raises(ConfigError, match="config key 'rmb_only': only for model_type compressor"):
        Config(rmb_only=True)


def test_trains_end_to_end_with_reference_points(tmp_path):
    from tests.conftest import write_dataset
    from train import checkpoint
    from train.loop import train
    from train.runlog import read_metrics

    write_dataset(str(tmp_path / "arith"), {"train": 200, "val": 32}, cmp_len=C, seq_len=S, content="arithmetic",
                  samples_per_shard=100)
    cfg = Config(**{**LLAMA, "cmp_len": None}, data_root=str(tmp_path), dataset="arith", device="cpu",
                 save_root=str(tmp_path / "runs"), log_mod=2, batch_size=8, val_batch_size=16, max_val_loops=1,
                 n_train_loops=8, n_epochs=1, lr=1e-2, gen_val_samples=8, blotch_p=0.3, rmb_task=True)
    folder = checkpoint.new_run_folder(cfg.save_root, cfg.exp_name)
    train(cfg, folder)
    rows = read_metrics(folder)
    tr = [r for r in rows if r["split"] == "train"]
    assert tr[-1]["loss"] < tr[0]["loss"] and all(r["blotch_frac"] > 0 for r in tr)
    val = rows[-1]
    assert {"cmp_ctx_loss", "no_ctx_loss", "full_ctx_loss", "no_ctx_acc", "full_ctx_acc", "gen_acc",
            "answer_acc"} <= set(val)
    state = checkpoint.load(folder)["model"]
    assert "embs" in state and any(k.startswith("base.") for k in state)


def test_model_parallel_device_map_gives_the_same_model():
    """model_parallel loads the base through accelerate's device_map (all on the CPU here): same outputs."""
    plain, sharded = compressor().eval(), compressor(model_parallel=True).eval()
    assert hasattr(sharded.base, "hf_device_map")
    w = plain.view(blotch(windows(), torch.arange(6), 0, SPEC))
    torch.testing.assert_close(sharded(w.input_ids, w.position_ids, w.mask), plain(w.input_ids, w.position_ids, w.mask))
    # evaluation of a checkpoint: load on the CPU, then shard with layers offloaded to disk
    from train.parallel import place

    other = build_model(Config(**LLAMA), synthetic.VOCAB, C + S).eval()
    other.load_state_dict(plain.state_dict())
    place(other, Config(**LLAMA, model_parallel=True, max_memory={"cpu": "40KB"}))
    assert "disk" in other.base.hf_device_map.values()
    torch.testing.assert_close(other(w.input_ids, w.position_ids, w.mask), plain(w.input_ids, w.position_ids, w.mask))


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(tmp_path):
    """A compressor (frozen base, new vectors and projection) under DDP with 2 ranks x batch 4 logs what one
    process with batch 8 logs, blotching and free-running metrics included."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import write_dataset
    from train.runlog import read_metrics

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_dataset(str(tmp_path / "arith"), {"train": 96, "val": 32}, cmp_len=C, seq_len=S, content="arithmetic",
                  samples_per_shard=32)
    common = {**LLAMA, "cmp_len": None, "data_root": str(tmp_path), "dataset": "arith", "device": "cpu",
              "save_root": str(tmp_path / "runs"), "log_mod": 1, "max_val_loops": 2, "n_train_loops": 4,
              "n_epochs": 1, "lr": 1e-2, "gen_val_samples": 8, "blotch_p": 0.3, "proj_cmpr": True, "rmb_task": True}
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = []
    for name, extra, launcher in (("one", {"batch_size": 8, "val_batch_size": 8}, []),
                                  ("two", {"batch_size": 4, "val_batch_size": 8, "multi_gpu": True},
                                   ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**common, **extra, "exp_name": name}))
        procs.append(subprocess.Popen([sys.executable, *launcher, "-m", "train", str(path)], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    a = read_metrics(str(tmp_path / "runs" / "one" / "one_0"))
    b = read_metrics(str(tmp_path / "runs" / "two" / "two_0"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 4]
    for x, y in zip(a, b):
        for k in ("loss", "acc", "blotch_frac", "gen_acc", "no_ctx_loss", "full_ctx_loss"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x, y)


@pytest.mark.parametrize("rmb_task", [False, True])
def test_reference_points(rmb_task):
    """cmp_ctx is the continuation loss alone: the whole val objective without rmb_task, less than all of it
    with; no_ctx and full_ctx are the base LM on the continuation alone and on the whole window."""
    from train.loss import token_loss

    m = compressor(rmb_task=rmb_task).eval()
    ids = windows()
    sums = m.reference_sums(ids, SPEC)
    w = m.view(blotch(ids, torch.zeros(6, dtype=torch.long), 0, SPEC, train=False))
    whole = token_loss(m(w.input_ids, w.position_ids, w.mask), w.targets)
    cont = int((w.columns >= C).sum())
    assert sums["cmp_ctx_count"] == cont and (whole.count > cont) == rmb_task
    if not rmb_task:
        assert sums["cmp_ctx_nll"] == pytest.approx(float(whole.nll), rel=1e-6)
    assert sums["full_ctx_count"] == cont and sums["no_ctx_count"] == cont - 6  # each row's first token
