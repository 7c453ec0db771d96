"""python -m train.sweep with the local executor on tiny arithmetic runs: folders, bookkeeping, rerun = resume
(after kill -9 too), failures, stopping without orphans, bad ranges files; python -m train.report; trackers."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train import ROOT, TINY, close
from train.runlog import read_metrics

# 2 epochs of 4 steps, a checkpoint every 2: a run takes a few seconds, most of them imports
BASE = {**TINY, "n_train_loops": 4, "checkpt_mod": 2, "gen_val_samples": 8}
SECRET = {"secret": "hunter2"}  # storage_options: the runs get them, no file of the sweep holds them
GRID = {"blotch_p": [0.0, 0.5], "combos": {"seed": [0, 1], "lr": [0.003, 0.01]}}
GRID_FOLDERS = ["g_0_blotch_p0.0_seed0_lr0.003", "g_1_blotch_p0.0_seed1_lr0.01", "g_2_blotch_p0.5_seed0_lr0.003",
                "g_3_blotch_p0.5_seed1_lr0.01"]


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> str:
    from tests.conftest import arithmetic_root

    return arithmetic_root(tmp_path_factory, train=400, val=64)


def write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def base_config(arith: str, tmp_path, exp_name: str, **kw) -> str:
    cfg = {**BASE, "data_root": arith, "dataset": "arith", "save_root": str(tmp_path / "runs"), "exp_name": exp_name}
    return write(tmp_path / f"{exp_name}.json", {**cfg, **kw})


def sweep(*args: str, without_ray: bool = False) -> subprocess.Popen:
    """The sweep CLI in its own process group (session), as a terminal would run it; `without_ray`: any import
    of ray fails."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # runs on CPU
    # Ctrl-C as in a terminal's foreground job (a job started in the background, as CI may run the tests, ignores it)
    block = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    block += "sys.modules['ray'] = None; " if without_ray else ""
    main = [sys.executable, "-c", block + "from train.sweep import main; sys.exit(main(sys.argv[1:]))"]
    return subprocess.Popen([*main, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def state(exp: str) -> dict:
    return json.load(open(os.path.join(exp, "sweep.json")))


def results(exp: str) -> list[dict]:
    return list(csv.DictReader(open(os.path.join(exp, "results.csv"))))


def assert_no_secret(folder: str) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            assert b"hunter2" not in open(os.path.join(root, name), "rb").read(), os.path.join(root, name)


def live_members(pgid: int, timeout: float = 10) -> list[int]:
    """Processes of the group still running after up to `timeout` s (a signal takes a moment to land; a zombie
    only waits for its reaper)."""
    deadline = time.time() + timeout
    while True:
        pids = []
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(d))
        if not pids or time.time() > deadline:
            return pids
        time.sleep(0.1)


@pytest.fixture(scope="module")
def grid(arith, tmp_path_factory) -> tuple[str, str, str]:
    """A 2 x 2 sweep (a grid key crossed with paired combos), two runs at a time: (exp folder, stdout, config)."""
    tmp = tmp_path_factory.mktemp("grid")
    cfg, ranges = base_config(arith, tmp, "g", storage_options=SECRET), write(tmp / "ranges.json", GRID)
    rc, out, err = finish(sweep(cfg, ranges, "--runs_per_device", "2"))
    assert rc == 0, out + err
    return str(tmp / "runs" / "g"), out, cfg


def test_grid_with_combos(grid):
    exp, out, _ = grid
    assert sorted(n for n in os.listdir(exp) if not n.startswith(".")) == [
        *GRID_FOLDERS, "results.csv", "results.md", "results.png", "sweep.json"]
    s = state(exp)
    assert [(r["folder"], r["values"], r["status"]) for r in s["runs"]] == [
        (GRID_FOLDERS[0], {"blotch_p": 0.0, "seed": 0, "lr": 0.003}, "done"),
        (GRID_FOLDERS[1], {"blotch_p": 0.0, "seed": 1, "lr": 0.01}, "done"),
        (GRID_FOLDERS[2], {"blotch_p": 0.5, "seed": 0, "lr": 0.003}, "done"),
        (GRID_FOLDERS[3], {"blotch_p": 0.5, "seed": 1, "lr": 0.01}, "done")]
    assert s["keys"] == ["blotch_p", "seed", "lr"] and s["ranges"] == GRID and s["base"]["exp_name"] == "g"
    for folder in GRID_FOLDERS:
        hyper = json.load(open(os.path.join(exp, folder, "hyperparams.json")))
        values = next(r["values"] for r in s["runs"] if r["folder"] == folder)
        assert {k: hyper[k] for k in values} == values
        assert [r["step"] for r in read_metrics(os.path.join(exp, folder)) if r["split"] == "val"] == [4, 8]
    rows = results(exp)
    assert sorted(r["run"] for r in rows) == GRID_FOLDERS and all(r["status"] == "done" for r in rows)
    assert [r["best"] for r in rows] == ["*", "", "", ""]
    assert [float(r["val_loss"]) for r in rows] == sorted(float(r["val_loss"]) for r in rows)
    assert all(r["steps"] == "8" and r["answer_acc"] != "" and float(r["tokens_per_s"]) > 0 for r in rows)
    lines = out.splitlines()  # one line per start and end; the runs' own output stays in their training_log.txt
    assert sum(ln.startswith("start  g_") for ln in lines) == 4 and sum(ln.startswith("done   g_") for ln in lines) == 4
    assert "epoch 1/2" not in out and "epoch 1/2" in open(os.path.join(exp, GRID_FOLDERS[0], "training_log.txt")).read()
    assert s["base"]["storage_options"] == {"secret": "<redacted>"}
    assert_no_secret(exp)


def test_rerun_starts_nothing_and_more_values_add_runs(grid, tmp_path):
    exp, _, cfg = grid
    before = {f: os.path.getmtime(os.path.join(exp, f, "metrics.jsonl")) for f in GRID_FOLDERS}
    rc, out, err = finish(sweep(cfg, write(tmp_path / "ranges.json", GRID), without_ray=True))  # local: no ray
    assert rc == 0 and "4 runs, 4 done, 0 to run" in out and "start" not in out, out + err
    assert before == {f: os.path.getmtime(os.path.join(exp, f, "metrics.jsonl")) for f in GRID_FOLDERS}
    more = {**GRID, "blotch_p": [0.0, 0.5, 0.9]}  # dry run: the new combinations take the next free numbers
    rc, out, err = finish(sweep(cfg, write(tmp_path / "more.json", more), "--dry_run"))
    assert rc == 0, err
    assert out.splitlines()[:6] == [
        f"{GRID_FOLDERS[0]}  blotch_p=0.0 seed=0 lr=0.003  [done]",
        f"{GRID_FOLDERS[1]}  blotch_p=0.0 seed=1 lr=0.01  [done]",
        f"{GRID_FOLDERS[2]}  blotch_p=0.5 seed=0 lr=0.003  [done]",
        f"{GRID_FOLDERS[3]}  blotch_p=0.5 seed=1 lr=0.01  [done]",
        "g_4_blotch_p0.9_seed0_lr0.003  blotch_p=0.9 seed=0 lr=0.003  [pending]",
        "g_5_blotch_p0.9_seed1_lr0.01  blotch_p=0.9 seed=1 lr=0.01  [pending]"]
    assert len(state(exp)["runs"]) == 4  # a dry run writes nothing


def test_changed_base_config_or_keys_are_refused(grid, tmp_path, capsys):
    from train.sweep import main

    exp, _, cfg = grid
    before = open(os.path.join(exp, "sweep.json")).read()
    assert main([cfg, write(tmp_path / "r.json", GRID), "--lr", "0.1", "--n_epochs", "3", "--devices", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: {exp}/sweep.json: the base config differs in ['n_epochs']; run "
                                       "with the same config and overrides, or sweep under another exp_name\n")
    assert main([cfg, write(tmp_path / "r.json", {"seed": [0]}), "--devices", "cpu"]) == 2
    assert "sweep.json sweeps ['blotch_p', 'seed', 'lr']" in capsys.readouterr().err
    assert open(os.path.join(exp, "sweep.json")).read() == before


@pytest.mark.parametrize("ranges, message", [
    ({"blotch_pp": [0.1]}, "r.json: unknown config key 'blotch_pp'; did you mean 'blotch_p'?"),
    ({"seed": [0], "blotch_p": [0.1, 1.5]},
     "r.json: run 1 (seed=0 blotch_p=1.5): config key 'blotch_p': 1.5 must be <= 1"),
    ({"blotch_p": []}, "r.json: 'blotch_p' has no values (an empty list)"),
    ({"blotch_p": 0.5}, "r.json: 'blotch_p' must be a list of values, not 0.5"),
    ({"combos": {"seed": [0, 1], "lr": [0.1]}},
     "r.json: the lists in 'combos' must have equal lengths, got {'seed': 2, 'lr': 1}"),
    ({"seed": [0], "combos": {"seed": [1]}}, "r.json: 'seed' is both in the grid and in 'combos'"),
    ({"save_root": ["a", "b"]}, "r.json: 'save_root' cannot be swept"),
    ([0.1, 0.2], "r.json: expected a JSON object"),
    ({}, "no keys to sweep"),
    ({"tracker": ["none", "wandb"]}, "config key 'tracker': 'wandb' needs the wandb package"),
    ({"lr.x": [1]}, "r.json: 'lr.x': only a dict-valued key takes a dotted entry ('lr' is not one)"),
    ({"hf_confg.n_layer": [1]}, "r.json: unknown config key 'hf_confg'; did you mean 'hf_config'?"),
])
def test_bad_ranges_are_one_line_errors_before_anything_exists(arith, tmp_path, capsys, ranges, message):
    from train.sweep import main

    if "wandb" in message and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    assert main([base_config(arith, tmp_path, "bad"), write(tmp_path / "r.json", ranges), "--devices", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "runs")


def test_an_address_where_no_cluster_answers_is_refused_at_once(arith, tmp_path, capsys):
    from train.sweep import main

    args = [base_config(arith, tmp_path, "a"), write(tmp_path / "r.json", {"seed": [0]})]
    assert main([*args, "--executor", "ray", "--address", "127.0.0.1:1"]) == 2
    assert "error: --address 127.0.0.1:1: no Ray cluster answers there" in capsys.readouterr().err
    assert main([*args, "--devices", "cpu", "--executor", "ray"]) == 2
    assert capsys.readouterr().err == "error: command line: --devices is for --executor local\n"
    assert not os.path.exists(tmp_path / "runs")


def test_folder_names_and_expansion_order():
    from train.sweep import expand, folder_suffix, swept_keys

    ranges = {"n_layers": [1, 2], "combos": {"hf_config": [{"n_layer": 2}, None], "separator_ids": [[5, 6], [7]]},
              "tie_weights": [True], "data_files": ["a/b c.txt"]}
    runs = expand(ranges)
    assert [(r["n_layers"], r["separator_ids"]) for r in runs] == [(1, [5, 6]), (1, [7]), (2, [5, 6]), (2, [7])]
    keys = swept_keys(ranges)
    assert keys == ["n_layers", "hf_config", "separator_ids", "tie_weights", "data_files"]
    assert folder_suffix(keys, runs[0]) == ("_n_layers1_hf_confign_layer:2_separator_ids56_tie_weightsTrue"
                                            "_data_filesabc.txt")


def test_a_dotted_key_sets_one_entry_of_a_dict_valued_key():
    """Depth sweeps of a Hugging Face model: "hf_config.num_hidden_layers" changes that entry and keeps the rest."""
    from train.sweep import expand, folder_suffix, swept_keys, with_values

    ranges = {"hf_config.num_hidden_layers": [2, 5]}
    base = {"hf_config": {"hidden_size": 128, "num_hidden_layers": 4}, "lr": 0.1}
    runs = [with_values(base, values) for values in expand(ranges)]
    assert [r["hf_config"] for r in runs] == [{"hidden_size": 128, "num_hidden_layers": 2},
                                              {"hidden_size": 128, "num_hidden_layers": 5}]
    assert base["hf_config"]["num_hidden_layers"] == 4 and with_values({"hf_config": None}, {"hf_config.a": 1}) == \
        {"hf_config": {"a": 1}}
    assert folder_suffix(swept_keys(ranges), expand(ranges)[1]) == "_hf_config.num_hidden_layers5"


def test_gpu_slots_and_ddp_runs(monkeypatch):
    """GPU groups get their own CUDA_VISIBLE_DEVICES, K runs each, interleaved; the cores are split over all
    slots; a run of several GPUs is a DDP run (multi_gpu), unless it shards one model (model_parallel)."""
    from train.config import Config, ConfigError
    from train.sweep import Run, Slot, Sweep, local_slots

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert local_slots("0,1,2,3", 2, 2) == [Slot("0,1", 4), Slot("2,3", 4), Slot("0,1", 4), Slot("2,3", 4)]
    assert local_slots("cpu", 3, None) == [Slot("", 5)] * 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert local_slots(None, 1, None) == [Slot("5", 8), Slot("7", 8)]
    with pytest.raises(ConfigError, match="--gpus_per_run 3 does not divide the 2 devices 5,7"):
        local_slots(None, 1, 3)
    sweep = Sweep("x", Config(), {}, [], [], gpus_per_run=2)
    assert sweep.config(Run("r", {"lr": 0.1}))["multi_gpu"] is True
    assert sweep.config(Run("r", {"model_parallel": True}))["multi_gpu"] is False


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_metrics(grid, arith, tmp_path):
    """kill -9 of the sweep's whole process group mid-run; the same command again resumes the killed runs from
    their checkpoints: every metrics.jsonl equals the uninterrupted sweep's, TensorBoard has each val loss once."""
    exp_g, _, _ = grid
    cfg = base_config(arith, tmp_path, "k", tracker="tensorboard")
    ranges = write(tmp_path / "ranges.json", {"blotch_p": [0.5], "combos": GRID["combos"]})
    exp = str(tmp_path / "runs" / "k")
    p = sweep(cfg, ranges, "--runs_per_device", "2")
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(exp, "k_0_blotch_p0.5_seed0_lr0.003", "latest")):  # checkpt_2: mid-epoch
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not live_members(p.pid)
    assert all(r["status"] == "running" for r in state(exp)["runs"])
    rc, out, err = finish(sweep(cfg, ranges, "--runs_per_device", "2"))
    assert rc == 0 and "start  k_0_blotch_p0.5_seed0_lr0.003 (resumes from checkpt_" in out, out + err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder, reference in zip(("k_0_blotch_p0.5_seed0_lr0.003", "k_1_blotch_p0.5_seed1_lr0.01"), GRID_FOLDERS[2:]):
        rows = read_metrics(os.path.join(exp, folder))
        close(rows, read_metrics(os.path.join(exp_g, reference)))
        events = EventAccumulator(os.path.join(exp, folder))
        events.Reload()
        val = [r for r in rows if r["split"] == "val"]
        assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [
            (r["step"], pytest.approx(r["loss"])) for r in val]
    assert [r["status"] for r in results(exp)] == ["done", "done"]


@pytest.mark.slow
def test_a_failing_run_does_not_stop_the_others(arith, tmp_path):
    """lr 1e30 makes the loss NaN at step 2: that run fails with its error line, the other one ends, the sweep
    exits 1 naming it; a rerun retries it and only it."""
    cfg, ranges = base_config(arith, tmp_path, "f"), write(tmp_path / "ranges.json", {"lr": [1e30, 0.003]})
    rc, out, err = finish(sweep(cfg, ranges, "--runs_per_device", "2"))
    error = "FloatingPointError: train loss is nan at step 2: the run diverged"
    assert rc == 1 and f"1 of 2 runs failed: f_0_lr1e+30 ({error})" in err, out + err
    assert f"FAILED f_0_lr1e+30: {error}" in out and "done   f_1_lr0.003" in out
    exp = str(tmp_path / "runs" / "f")
    assert [(r["status"], r["error"]) for r in state(exp)["runs"]] == [("failed", error), ("done", None)]
    assert {r["run"]: (r["status"], r["error"]) for r in results(exp)} == {
        "f_0_lr1e+30": ("failed", error), "f_1_lr0.003": ("done", "")}
    rc, out, err = finish(sweep(cfg, ranges))
    assert rc == 1 and "start  f_0_lr1e+30\n" in out and "f_1_lr0.003" not in out.split("# f:")[0], out + err


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stopping_the_sweep_stops_every_run(arith, tmp_path, how):
    """Ctrl-C (SIGINT to the whole foreground group) or SIGTERM to the sweep alone: every run stops, nothing of
    the group is left running, and the runs are marked stopped for the rerun."""
    cfg = base_config(arith, tmp_path, "s", n_train_loops=100000)
    p = sweep(cfg, write(tmp_path / "ranges.json", {"seed": [0, 1]}), "--runs_per_device", "2")
    exp = str(tmp_path / "runs" / "s")
    deadline = time.time() + 120
    while not all(os.path.exists(os.path.join(exp, f"s_{i}_seed{i}", "metrics.jsonl")) for i in (0, 1)):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
    else:
        os.kill(p.pid, signal.SIGTERM)
    rc, out, err = finish(p, timeout=60)
    assert rc == 128 + (signal.SIGINT if how == "ctrl-c" else signal.SIGTERM), out + err
    assert "stopped: the same command resumes the sweep" in err
    assert not live_members(p.pid)
    assert [r["status"] for r in state(exp)["runs"]] == ["stopped", "stopped"]


def fake_run(exp, name: str, lr: float, val: list[tuple[int, float, float]], n_epochs: int = 2) -> None:
    """A run folder as `python -m train` leaves it: hyperparams.json and metrics.jsonl."""
    folder = exp / name
    folder.mkdir(parents=True)
    write(folder / "hyperparams.json", {"exp_name": "p", "lr": lr, "seed": 0, "n_epochs": n_epochs,
                                        "storage_options": {"key": "<redacted>"}})
    rows = [{"step": s, "epoch": i + 1, "split": "train", "loss": 3.0, "acc": 0.1, "tokens_per_s": 1000.0 * (i + 1)}
            for i, (s, _, _) in enumerate(val)]
    rows += [{"step": s, "epoch": i + 1, "split": "val", "loss": loss, "acc": acc, "answer_acc": acc / 2}
             for i, (s, loss, acc) in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "spl')


def test_report_of_plain_runs(tmp_path, capsys):
    """Plain `python -m train` runs: the keys whose values differ are the columns; sorting, best, status."""
    from train.report import main

    exp = tmp_path / "p"
    fake_run(exp, "p_0", 0.001, [(5, 2.0, 0.3), (10, 1.5, 0.5)])
    fake_run(exp, "p_1", 0.01, [(5, 1.8, 0.6), (10, 1.7, 0.55)])
    fake_run(exp, "p_2", 0.1, [(5, 2.5, 0.2)])  # killed after its first epoch
    assert main([str(exp)]) == 0
    rows = results(str(exp))
    assert [(r["best"], r["run"], r["lr"], r["status"], r["val_loss"], r["best_val_acc"]) for r in rows] == [
        ("*", "p_0", "0.001", "done", "1.5", "0.5"), ("", "p_1", "0.01", "done", "1.7", "0.6"),
        ("", "p_2", "0.1", "incomplete", "2.5", "0.2")]
    assert rows[0]["answer_acc"] == "0.25" and rows[0]["steps"] == "10" and float(rows[0]["tokens_per_s"]) == 1500
    assert "| * | p_0 | 0.001 | done |" in capsys.readouterr().out
    assert main([str(exp), "--sort", "val_acc"]) == 0
    assert [r["run"] for r in results(str(exp))] == ["p_1", "p_0", "p_2"]
    assert os.path.getsize(exp / "results.png") > 0
    assert main([str(exp), "--sort", "nope"]) == 2 and "--sort 'nope': not a column" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2 and "no runs" in capsys.readouterr().err


def test_train_cli_refuses_a_missing_tracker_and_a_used_save_folder(grid, capsys):
    from train.__main__ import main

    exp, _, cfg = grid
    folder = os.path.join(exp, GRID_FOLDERS[0])
    assert main([cfg, "--save_folder", folder]) == 2
    assert capsys.readouterr().err == (f"error: --save_folder {folder}: already holds a run; continue it with "
                                       f"--resume {folder}\n")
    if importlib.util.find_spec("wandb") is None:
        assert main([cfg, "--tracker", "wandb"]) == 2
        assert capsys.readouterr().err == ("error: config key 'tracker': 'wandb' needs the wandb package, which is not "
                                           "installed (pip install wandb)\n")


def test_a_stop_signal_never_lands_inside_a_poll(tmp_path, monkeypatch):
    """Ctrl-C raised inside Popen.poll() can leave the Popen's wait lock held, and the stop that follows then
    waits on it forever (a sweep that never exits): the local pool takes stop signals only between polls."""
    import train.sweep as sweep_module
    from train.launch import STOP_SIGNALS, RunSpec

    class SleepChild:  # a run that would go on for 30 s; its poll is where Ctrl-C arrives
        def __init__(self, spec, threads, gpus, storage_options):
            self.resumed_from, self.stopping, self.polls = None, False, 0
            self.proc = subprocess.Popen(["sleep", "30"])
            children.append(self)

        def poll(self):
            os.kill(os.getpid(), signal.SIGINT)
            rc = self.proc.poll()
            self.polls += 1  # reached only when the signal did not interrupt the poll
            return rc

        def seconds(self):
            return 0.0

        def cleanup(self):
            pass

    class Record:
        def __init__(self):
            self.events = []

        def __getattr__(self, name):
            return lambda i, *a, **kw: self.events.append((name, i))

    children, events = [], Record()
    monkeypatch.setattr(sweep_module, "Child", SleepChild)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep_module.run_local([RunSpec(str(tmp_path / "r"), {}, str(tmp_path))], [sweep_module.Slot("", 1)],
                                   events, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual Ctrl-C again
    finally:
        signal.signal(signal.SIGINT, before)
        STOP_SIGNALS.clear()
    (child,) = children
    assert child.polls == 1 and child.stopping and child.proc.returncode == -signal.SIGTERM
    assert events.events == [("started", 0), ("stopped", 0)]
