"""bench/train_gpu.py runs end to end (tiny, on CPU) without datasets, webdataset or torchdata, as on the GPU
machine, and reports every figure it promises."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_without_optional_packages(tmp_path):
    out = tmp_path / "figures.json"
    code = ("import runpy, sys\n"
            "for name in ('torchdata', 'webdataset', 'datasets', 'preprocess'):\n"
            "    sys.modules[name] = None  # any import of them now fails\n"
            f"sys.argv = ['train_gpu.py', '--smoke', '--compile', 'off', '--n_workers', '0', '--out', {str(out)!r}]\n"
            f"runpy.run_path({os.path.join(ROOT, 'bench', 'train_gpu.py')!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pipeline overhead, p=0.3 eager" in p.stdout and "blotch() / step, p=0.3 eager" in p.stdout
    results = json.load(open(out))["results"]
    assert set(results) == {f"{s} p={p} eager" for s in ("shards", "memory") for p in (0.0, 0.3)}
    assert results["memory p=0.3 eager"]["tokens_per_step"] < results["memory p=0.0 eager"]["tokens_per_step"]
    assert all(r["tokens_per_s"] > 0 for r in results.values())
