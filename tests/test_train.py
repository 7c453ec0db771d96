"""The training loop end to end on tiny arithmetic data: outputs, accumulation, exact resume after kill -9, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from shards import storage
from train import checkpoint
from train.config import Config
from train.runlog import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "h_mult": 2, "drop_p": 0.0, "lr": 3e-3, "warmup_steps": 2,
        "device": "cpu", "log_mod": 1, "val_batch_size": 16, "max_val_loops": 2, "n_epochs": 2}
EXACT_KEYS = ("step", "epoch", "split", "loss", "acc", "lr", "blotch_frac", "grad_norm")  # all but tokens_per_s


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> str:
    from tests.conftest import arithmetic_root

    return arithmetic_root(tmp_path_factory, train=400, val=64)


def config(arith: str, tmp_path, **kw) -> Config:
    return Config(data_root=arith, dataset="arith", save_root=str(tmp_path / "runs"), **{**TINY, **kw})


def run_inline(cfg: Config) -> tuple[str, list[dict]]:
    from train.loop import train

    folder = checkpoint.new_run_folder(cfg.save_root, cfg.exp_name)
    train(cfg, folder)
    return folder, read_metrics(folder)


def cli(args: list[str], **env: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def main_in_subprocess(cfg_path: str, prelude: str, timeout: float) -> None:
    """`train`'s main in a fresh interpreter after `prelude` ran there (to block imports, fake GPUs ...)."""
    p = cli(["-c", f"{prelude}\nfrom train.__main__ import main\nassert main([{cfg_path!r}]) == 0\n"])
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out


def write_cfg(tmp_path, cfg: Config, name: str = "cfg.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def close(a: list[dict], b: list[dict], rel: float = 0.0) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 0
    for x, y in zip(a, b):
        for k in EXACT_KEYS if x["split"] == "train" else EXACT_KEYS[:-1]:
            assert x[k] == (y[k] if isinstance(y[k], str) else pytest.approx(y[k], rel=rel, abs=rel)), (k, x, y)


def test_outputs_and_learning(arith, tmp_path):
    cfg = config(arith, tmp_path, n_train_loops=8, n_epochs=3, checkpt_mod=5, keep_checkpoints=2,
                 storage_options={"secret": "hunter2"}, lr_schedule="cosine")
    folder, rows = run_inline(cfg)
    names = sorted(os.listdir(folder))
    assert names == ["checkpt_20.pt", "checkpt_24.pt", "curves.png", "hyperparams.json", "latest", "metrics.jsonl",
                     "training_log.txt"]
    assert "hunter2" not in open(os.path.join(folder, "hyperparams.json")).read()
    assert checkpoint.latest_path(folder).endswith("checkpt_24.pt")
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [8, 16, 24] and val[-1]["loss"] < val[0]["loss"]
    assert all(r["ppl"] == pytest.approx(2.718281828 ** r["loss"]) for r in val)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 25))
    fracs = [r["blotch_frac"] for r in train_rows]
    assert min(fracs) > 0 and 0.05 < sum(fracs) / len(fracs) < 0.3 and all(r["blotch_frac"] == 0 for r in val)
    assert train_rows[0]["lr"] == pytest.approx(cfg.lr / 2)  # warmup
    log = open(os.path.join(folder, "training_log.txt")).read()
    assert "⟦" in log and "‖" in log and "val loss" in log
    summary = log[log.index("done after 24 steps:"):]
    assert "answer accuracy" in summary and "solved example" in summary  # what matters leads
    assert folder.endswith("run_0") and run_inline(cfg)[0].endswith("run_1")


def test_accumulation_equals_big_batch(arith, tmp_path):
    """4 micro-batches of 8 are one batch of 32: same losses, same weights."""
    a_folder, a = run_inline(config(arith, tmp_path, exp_name="a", n_train_loops=3, batch_size=8, n_grad_loops=4))
    b_folder, b = run_inline(config(arith, tmp_path, exp_name="b", n_train_loops=3, batch_size=32, n_grad_loops=1))
    close(a, b, rel=1e-5)
    wa, wb = checkpoint.load(a_folder)["model"], checkpoint.load(b_folder)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_config_disagreeing_with_data_fails_first(arith, tmp_path):
    path = write_cfg(tmp_path, config(arith, tmp_path, cmp_len=5))
    p = cli(["-m", "train", path])
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and out.strip().splitlines()[-1].startswith("error: config key 'cmp_len': 5 differs from 16")
    assert not os.path.exists(tmp_path / "runs")


def test_main_fetches_the_manifest_once(arith, tmp_path, monkeypatch):
    """`python -m train` checks the config against its data before any folder exists, and the loop builds on
    what that check read, loaders included: one manifest fetch per process."""
    import shards.dataset
    from train import data
    from train.__main__ import main

    fetched, load = [], data.load_manifest
    for module in (data, shards.dataset):  # the trainer's check, and each loader's dataset
        monkeypatch.setattr(module, "load_manifest", lambda fs, root: fetched.append(root) or load(fs, root))
    assert main([write_cfg(tmp_path, config(arith, tmp_path, n_train_loops=1, n_epochs=1))]) == 0
    assert len(fetched) == 1 and os.listdir(tmp_path / "runs")


@pytest.mark.slow
def test_resume_after_kill_is_exact(arith, tmp_path):
    """kill -9 mid-run, then --resume: metrics.jsonl equals an uninterrupted run's, bit for bit."""
    cfg = config(arith, tmp_path, n_train_loops=12, n_epochs=3, checkpt_mod=3, drop_p=0.1,
                 posenc_type="RandPositionalEncoding", n_grad_loops=2, lr_schedule="plateau", patience=1)
    full = cli(["-m", "train", write_cfg(tmp_path, cfg.replace(exp_name="full"))])
    assert full.wait(timeout=300) == 0, full.stdout.read()
    reference = read_metrics(os.path.join(cfg.save_root, "full", "full_0"))

    folder = os.path.join(cfg.save_root, "killed", "killed_0")
    victim = cli(["-m", "train", write_cfg(tmp_path, cfg.replace(exp_name="killed"))])
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(folder, "checkpt_6.pt")):  # mid-epoch, with more to come
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert len(read_metrics(folder)) < len(reference)
    resumed = cli(["-m", "train", "--resume", folder])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    close(read_metrics(folder), reference)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(arith, tmp_path):
    """2 ranks x batch 8 == 1 rank x batch 16; one pass per epoch with a partial accumulation tail; no hang.
    Validation is global (val_batch_size and max_val_loops count global batches), so both validate on the same
    samples and a plateau schedule takes the same path."""
    common = dict(n_train_loops=None, n_grad_loops=4, n_epochs=2, val_batch_size=16, lr_schedule="plateau",
                  patience=1, gen_val_samples=24)
    one_cfg = config(arith, tmp_path, exp_name="one", batch_size=16, **common)
    two_cfg = config(arith, tmp_path, exp_name="two", batch_size=8, multi_gpu=True, **common)
    one = cli(["-m", "train", write_cfg(tmp_path, one_cfg)])
    two = cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
               write_cfg(tmp_path, two_cfg, "two.json")])
    assert one.wait(timeout=300) == 0, one.stdout.read()
    assert two.wait(timeout=300) == 0, two.stdout.read()
    a = read_metrics(os.path.join(tmp_path, "runs", "one", "one_0"))
    b = read_metrics(os.path.join(tmp_path, "runs", "two", "two_0"))
    assert [r["step"] for r in a if r["split"] == "val"] == [7, 14]  # 25 batches of 16 = 6 x 4 + a tail of 1
    close(a, b, rel=1e-5)
    for x, y in zip(a, b):
        if x["split"] == "val":
            assert x["gen_samples"] == y["gen_samples"] == 24
            assert {k: x[k] for k in ("gen_acc", "answer_acc", "gen_steps")} == \
                pytest.approx({k: y[k] for k in ("gen_acc", "answer_acc", "gen_steps")})
    assert not os.path.exists(os.path.join(tmp_path, "runs", "two", "two_1"))  # only rank 0 made a folder


@pytest.mark.slow
def test_two_torchrun_nodes_match_one_process(arith, tmp_path):
    """Multi-node training through torchrun's c10d rendezvous: two "nodes" of one gloo process each on
    127.0.0.1 give the val metrics of one process with the same global batch."""
    import socket

    common = dict(n_train_loops=3, n_epochs=2, val_batch_size=16, gen_val_samples=16)
    one_cfg = config(arith, tmp_path, exp_name="one", batch_size=16, **common)
    two_cfg = write_cfg(tmp_path, config(arith, tmp_path, exp_name="nodes", batch_size=8, multi_gpu=True, **common),
                        "nodes.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [cli(["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}",
                  "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", "-m", "train",
                  two_cfg]) for i in range(2)]
    one = cli(["-m", "train", write_cfg(tmp_path, one_cfg)])
    for p in (*nodes, one):
        assert p.wait(timeout=300) == 0, p.stdout.read()
    a = read_metrics(os.path.join(tmp_path, "runs", "one", "one_0"))
    b = read_metrics(os.path.join(tmp_path, "runs", "nodes", "nodes_0"))
    close(a, b, rel=1e-5)
    assert json.load(open(os.path.join(tmp_path, "runs", "nodes", "nodes_0", "hyperparams.json")))["world_size"] == 2
    assert os.listdir(os.path.join(tmp_path, "runs", "nodes")) == ["nodes_0"]


def test_resume_with_more_epochs_keeps_the_planned_steps(arith, tmp_path):
    """A cosine run planned for 2 epochs and resumed mid-way with n_epochs 3 takes exactly the planned run's
    steps up to its planned end, then a new cosine segment from lr over the added epoch (documented)."""
    from train.config import ConfigError, resume_config
    from train.loop import train

    cfg = config(arith, tmp_path, n_train_loops=4, n_epochs=2, checkpt_mod=2, keep_checkpoints=10, min_lr=1e-4)
    _, planned = run_inline(cfg.replace(exp_name="planned"))
    folder, _ = run_inline(cfg.replace(exp_name="extended"))
    train(resume_config(folder, {"n_epochs": 3}), folder, checkpoint.load(os.path.join(folder, "checkpt_6.pt")))
    rows = read_metrics(folder)
    close([r for r in rows if r["step"] <= 8], planned)
    added = [r["lr"] for r in rows if r["split"] == "train" and r["step"] > 8]
    assert len(added) == 4 and added[0] == pytest.approx(cfg.lr) and added == sorted(added, reverse=True)
    assert added[-1] > cfg.min_lr
    with pytest.raises(ConfigError, match=r"cannot change \['shuffle_block'\]"):
        resume_config(folder, {"shuffle_block": 4})  # another data order is another experiment


def test_trains_without_optional_packages(arith, tmp_path):
    """`train` needs neither torchdata, webdataset nor datasets, and never imports preprocess."""
    cfg = write_cfg(tmp_path, config(arith, tmp_path, n_train_loops=2, n_epochs=1))
    main_in_subprocess(cfg, "import sys\n"
                            "for name in ('torchdata', 'webdataset', 'datasets', 'preprocess'):\n"
                            "    sys.modules[name] = None  # any import of them now fails", timeout=120)


def test_torch_dtype_applies(arith, tmp_path):
    """bfloat16 and float16 really change the arithmetic; float16 runs a GradScaler whose state is saved."""
    runs = {dt: run_inline(config(arith, tmp_path, exp_name=dt, torch_dtype=dt, n_train_loops=2, n_epochs=1))
            for dt in ("float32", "bfloat16", "float16")}
    losses = {dt: [r["loss"] for r in rows] for dt, (_, rows) in runs.items()}
    assert losses["bfloat16"] != losses["float32"] and losses["float16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-2)
    assert checkpoint.load(runs["float16"][0])["scaler"]["scale"] > 0
    assert checkpoint.load(runs["float32"][0])["scaler"] == {}


def test_init_checkpt_loads_weights_only(arith, tmp_path):
    first, _ = run_inline(config(arith, tmp_path, exp_name="first", n_train_loops=3, n_epochs=1))
    from train.loop import build

    cfg = config(arith, tmp_path, exp_name="second", init_checkpt=first)
    run = build(cfg, str(tmp_path), None)
    for k, v in checkpoint.load(first)["model"].items():
        assert torch.equal(run.model.state_dict()[k], v)
    assert run.progress.step == 0 and run.opt.state_dict()["state"] == {}


def test_multi_gpu_without_gpus_says_how_to_run_on_cpu(arith, tmp_path):
    p = cli(["-m", "train", write_cfg(tmp_path, config(arith, tmp_path, multi_gpu=True))], CUDA_VISIBLE_DEVICES="")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "no visible GPU; on CPU use torchrun --nproc_per_node N -m train" in out


@pytest.mark.slow
def test_loader_workers_do_not_change_the_run(arith, tmp_path):
    kw = dict(n_train_loops=4, n_epochs=2, n_grad_loops=2, drop_p=0.1)
    _, a = run_inline(config(arith, tmp_path, exp_name="w0", n_workers=0, **kw))
    _, b = run_inline(config(arith, tmp_path, exp_name="w2", n_workers=2, **kw))
    close(a, b)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    folder = checkpoint.new_run_folder(str(tmp_path), "x")
    for step in (3, 6, 9, 12):
        checkpoint.save(folder, step, {"step": step}, keep=2)
    assert [s for s, _ in checkpoint.checkpoints(folder)] == [9, 12]
    assert checkpoint.load(folder) == {"step": 12}
    open(os.path.join(folder, "checkpt_15.pt.tmp-deadbeef"), "wb").write(b"half a file")
    storage.remove_stale_temps(None, folder)
    assert sorted(os.listdir(folder)) == ["checkpt_12.pt", "checkpt_9.pt", "latest"]
    assert checkpoint.new_run_folder(str(tmp_path), "x").endswith("x_1")


@pytest.mark.slow
def test_multi_gpu_relaunches_through_the_elastic_launcher(arith, tmp_path):
    """`python -m train` with multi_gpu starts one process per visible GPU via torch.distributed.run. Two GPUs
    are faked in the parent only; the children find no CUDA and run on CPU with gloo, like the real path."""
    cfg = write_cfg(tmp_path, config(arith, tmp_path, exp_name="elastic", multi_gpu=True, n_train_loops=2,
                                      n_epochs=1))
    main_in_subprocess(cfg, "import torch\ntorch.cuda.device_count = lambda: 2", timeout=300)
    folder = os.path.join(tmp_path, "runs", "elastic")
    assert os.listdir(folder) == ["elastic_0"]
    assert json.load(open(os.path.join(folder, "elastic_0", "hyperparams.json")))["world_size"] == 2
    assert [r["split"] for r in read_metrics(os.path.join(folder, "elastic_0"))] == ["train", "train", "val"]


def test_config_resolved_against_the_manifest(arith, tmp_path):
    from train.config import ConfigError
    from train.data import open_manifest, resolve

    cfg = config(arith, tmp_path)
    resolved = resolve(cfg, *open_manifest(cfg))
    assert (resolved.cmp_len, resolved.seq_len, resolved.separator_ids) == (16, 32, [2])
    assert resolve(cfg.replace(separator_ids=[5, 7]), *open_manifest(cfg)).separator_ids == [5, 7]
    with pytest.raises(ConfigError, match=r"'separator_ids': \[99\] outside the vocabulary of 18"):
        resolve(cfg.replace(separator_ids=[5, 99]), *open_manifest(cfg))
    with pytest.raises(ConfigError, match="'seq_len': 31 differs from 32"):
        resolve(cfg.replace(seq_len=31), *open_manifest(cfg))
