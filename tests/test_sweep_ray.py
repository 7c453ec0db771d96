"""python -m train.sweep --executor ray on a two-node Ray cluster on this machine (one CPU per node): the runs
spread over both nodes, end with the same metrics as the local executor's, and a failing trial is a failed run."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.test_sweep import SECRET, assert_no_secret, base_config, finish, results, state, sweep, write
from tests.test_train import close
from train.runlog import read_metrics

pytest.importorskip("ray.tune")
pytestmark = pytest.mark.slow

COMBOS = {"combos": {"seed": [0, 1], "lr": [0.003, 0.003]}}


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> str:
    from tests.conftest import arithmetic_root

    return arithmetic_root(tmp_path_factory, train=400, val=64)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes (head and worker) of one CPU each. Ray's files (sessions, logs, the address file that a bare
    ray.init() follows) go to a temporary folder of their own, outside the repository and away from any other
    Ray on this machine; processes and files go at the end."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under 108 bytes
        mp.setenv("RAY_TMPDIR", temp)  # also read by the sweep's subprocess, which inherits it
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        c.add_node(num_cpus=1)
        yield c.address
        c.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_matches_the_local_one(arith, cluster, tmp_path):
    local = base_config(arith, tmp_path, "local")
    rc, out, err = finish(sweep(local, write(tmp_path / "local_ranges.json", COMBOS), "--runs_per_device", "2"))
    assert rc == 0, out + err

    cfg = base_config(arith, tmp_path, "ray", storage_options=SECRET)
    ranges = {"combos": {"seed": [0, 1, 0], "lr": [0.003, 0.003, 1e30]}}  # the third run's loss is NaN at step 2
    p = sweep(cfg, write(tmp_path / "ray_ranges.json", ranges), "--executor", "ray", "--address", cluster)
    rc, out, err = finish(p)
    error = "FloatingPointError: train loss is nan at step 2: the run diverged"
    assert rc == 1 and f"1 of 3 runs failed: ray_2_seed0_lr1e+30 ({error})" in err, out + err
    exp = str(tmp_path / "runs" / "ray")
    runs = state(exp)["runs"]
    assert [(r["folder"], r["status"], r["error"]) for r in runs] == [
        ("ray_0_seed0_lr0.003", "done", None), ("ray_1_seed1_lr0.003", "done", None),
        ("ray_2_seed0_lr1e+30", "failed", error)]
    assert len({runs[0]["node"], runs[1]["node"]}) == 2  # one CPU per node: the two runs went to both nodes
    for i in (0, 1):
        close(read_metrics(os.path.join(exp, runs[i]["folder"])),
              read_metrics(os.path.join(tmp_path, "runs", "local", f"local_{i}_seed{i}_lr0.003")))
    local_files = sorted(os.listdir(os.path.join(tmp_path, "runs", "local", "local_0_seed0_lr0.003")))
    assert sorted(os.listdir(os.path.join(exp, runs[0]["folder"]))) == local_files  # Tune's files stay out
    assert os.path.isdir(os.path.join(exp, ".ray_tune"))
    assert_no_secret(exp)  # Tune's files included
    assert sorted(r["status"] for r in results(exp)) == ["done", "done", "failed"]
    assert "start  ray_0_seed0_lr0.003" in out and "Trial" not in out + err  # our lines, not Tune's reporter
