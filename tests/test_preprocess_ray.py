"""preprocess --executor ray on a real two-node Ray cluster (one per module, on this machine) with inputs and
output in the tests' S3 server: the same bytes as --executor local, a worker node lost mid-run, the driver
killed with SIGKILL and rerun, local paths refused on several nodes; and the two task kinds run directly."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

from preprocess.cli import main
from tests.assets import english_like_docs, write_jsonl
from tests.test_preprocess import tree_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = "16384"  # --unit_size: many units from a small corpus


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node of one CPU each. Ray's files go to a short temp folder (socket paths are
    limited to about 100 characters), workers import this checkout, and every process is gone afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp, "include_dashboard": False})
        try:
            c.add_node(num_cpus=1)
            yield c
        finally:
            if ray.is_initialized():
                ray.shutdown()
            c.shutdown()
            deadline = time.time() + 15
            while time.time() < deadline and _processes_using(temp):
                time.sleep(0.2)
            shutil.rmtree(temp, ignore_errors=True)
            assert not _processes_using(temp), f"Ray processes left behind: {_processes_using(temp)}"


def _processes_using(folder: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if folder.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return english_like_docs(900, seed=11, mean_words=100)


@dataclass
class Corpus:
    """Three jsonl files in a bucket of the tests' S3 server, and the local executor's output for them."""

    url: str  # s3://bucket
    options: dict
    files: str  # the --data_files glob
    reference: dict[str, str]  # file digests of the local executor's output for text_args(files)


@pytest.fixture(scope="module")
def corpus(s3_server, docs, tmp_path_factory, gpt2_tokenizer_dir) -> Corpus:
    """One much larger than a unit (cut into byte ranges), two small ones (read whole, as one unit)."""
    import s3fs

    from tests.conftest import s3_options

    options = s3_options(s3_server)
    fs = s3fs.S3FileSystem(**options)
    url = f"s3://ray-{uuid.uuid4().hex[:10]}"
    fs.mkdir(url[5:])
    tmp = tmp_path_factory.mktemp("corpus")
    for name, part in (("a", docs[:-10]), ("b", docs[-10:-5]), ("c", docs[-5:])):
        fs.put_file(write_jsonl(str(tmp / f"{name}.jsonl"), part), f"{url[5:]}/raw/{name}.jsonl")
    files = f"{url}/raw/*.jsonl"
    assert main([*text_args(files, gpt2_tokenizer_dir), "--data_root", str(tmp), "--storage_options",
                 json.dumps(options)]) == 0
    return Corpus(url, options, files, tree_digest(str(tmp / "json")))


def s3_digest(corpus: Corpus, prefix: str) -> dict[str, str]:
    import s3fs

    fs = s3fs.S3FileSystem(**corpus.options)
    fs.invalidate_cache()
    root = f"{corpus.url[5:]}/{prefix}"
    return {os.path.relpath(p, root): hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


def ray_args(cluster, corpus: Corpus, *args: str) -> list[str]:
    return [*args, "--executor", "ray", "--address", cluster.address, "--unit_size", UNIT,
            "--storage_options", json.dumps(corpus.options)]


def text_args(files: str, tok: str, *extra: str) -> list[str]:
    return ["--dataset", "json", "--data_files", files, "--tokenizer", tok, "--cmp_len", "8", "--seq_len", "56",
            "--shard_size", "20000", "--val_frac", "0.2", *extra]


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "preprocess", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO}


# ------------------------------------------------------------------ the same bytes as the local executor


def test_same_bytes_as_local_executor(cluster, corpus, gpt2_tokenizer_dir, capsys, monkeypatch):
    from preprocess import phases

    monkeypatch.setattr(phases, "GATHER_UNITS", 4)  # shards spanning more units are gathered first
    args = text_args(corpus.files, gpt2_tokenizer_dir)
    assert main(ray_args(cluster, corpus, *args, "--data_root", f"{corpus.url}/same")) == 0
    got = s3_digest(corpus, "same/json")
    assert got == corpus.reference
    assert sum(k.endswith(".arrow") for k in got) > 4  # several shards per split
    assert not any(k.startswith("_work") for k in got)  # intermediate files are gone
    found = re.search(r"2 nodes, 2 CPUs: (\d+) units \(0 already done\), \d+ shards \(0 already done, (\d+) gathers",
                      capsys.readouterr().out)
    assert int(found.group(1)) > 10 and int(found.group(2)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("source", ["glue", "arithmetic", "text", "parquet"])
def test_every_source_kind_same_bytes(source, cluster, corpus, docs, tmp_path, gpt2_tokenizer_dir, monkeypatch):
    """Pair sources (glue files, the staged arithmetic stream), one-document text files and parquet; both
    formats, --no_pack and --max_docs (cut inside a unit)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem(**corpus.options)
    url = f"{corpus.url}/{source}"
    common = ["--tokenizer", gpt2_tokenizer_dir, "--cmp_len", "16", "--seq_len", "48", "--shard_size", "8000"]
    if source == "glue":
        for split, part in (("train", docs[:500]), ("validation", docs[500:560])):
            rows = [{"sentence1": a[:80], "sentence2": b[:200], "label": i % 2, "idx": i}
                    for i, (a, b) in enumerate(zip(part, part[1:]))]
            fs.pipe_file(f"{url[5:]}/raw/{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        args = ["--dataset", "glue", "--data_files", f"train={url}/raw/train.jsonl",
                f"validation={url}/raw/validation.jsonl", *common, "--format", "webdataset"]
    elif source == "arithmetic":
        args = ["--dataset", "arithmetic", "--n_train", "2000", "--n_val", "200", "--max_num", "500",
                "--cmp_len", "16", "--seq_len", "64", "--shard_size", "20000", "--max_docs", "2100"]
    elif source == "text":
        # datasets' text builder cannot read from S3 (it passes `encoding` to the S3 client), with either
        # executor: local files, and the multi-node check is lifted since both nodes share this disk. Relative
        # paths: the workers run in another folder.
        from preprocess import ray_executor

        monkeypatch.setattr(ray_executor, "check_shared_storage", lambda *a: None)
        monkeypatch.chdir(tmp_path)
        (tmp_path / "txt").mkdir()
        for i, d in enumerate(docs[:120]):
            (tmp_path / "txt" / f"{i:04d}.txt").write_text(d.replace("\n\n", "\r\n\r\n", i % 2))
        args = ["--dataset", "text", "--data_files", "txt/*.txt", *common, "--val_frac", "0.1",
                "--no_pack", "--max_docs", "100", "--format", "webdataset"]
        url = "ray"
    else:
        for i in range(4):
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table({"text": docs[i * 200 : (i + 1) * 200]}), sink, row_group_size=50)
            fs.pipe_file(f"{url[5:]}/raw/{i}.parquet", sink.getvalue().to_pybytes())
        args = ["--dataset", "openwebtext", "--data_files", f"{url}/raw/*.parquet", *common]
    assert main([*args, "--data_root", str(tmp_path / "local"), "--storage_options", json.dumps(corpus.options)]) == 0
    assert main(ray_args(cluster, corpus, *args, "--data_root", f"{url}/out")) == 0
    name = source if source != "parquet" else "openwebtext"
    got = tree_digest(f"{url}/out/{name}") if source == "text" else s3_digest(corpus, f"{source}/out/{name}")
    assert got == tree_digest(str(tmp_path / "local" / name))


# ------------------------------------------------------------------ faults


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before the fault: make the corpus bigger"


def units_done(corpus: Corpus, prefix: str) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(**corpus.options)
    fs.invalidate_cache()
    return len(fs.glob(f"{corpus.url[5:]}/{prefix}/_work/units/*.meta"))


@pytest.mark.slow
def test_worker_node_lost_mid_run(cluster, corpus, gpt2_tokenizer_dir):
    args = ray_args(cluster, corpus, *text_args(corpus.files, gpt2_tokenizer_dir), "--data_root", f"{corpus.url}/lost")
    proc = subprocess.Popen(cli(args), env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = next(iter(cluster.worker_nodes))
    try:
        wait_for(lambda: units_done(corpus, "lost/json") >= 2, proc)
        cluster.remove_node(worker, allow_graceful=False)  # its raylet and workers killed, their tasks lost
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
    finally:
        proc.kill()
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    assert s3_digest(corpus, "lost/json") == corpus.reference


@pytest.mark.slow
def test_driver_killed_then_rerun_skips_finished_work(cluster, corpus, gpt2_tokenizer_dir, capsys):
    args = ray_args(cluster, corpus, *text_args(corpus.files, gpt2_tokenizer_dir), "--data_root", f"{corpus.url}/killed")
    proc = subprocess.Popen(cli(args), env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: units_done(corpus, "killed/json") >= 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "manifest.json" not in s3_digest(corpus, "killed/json")
    assert main(args) == 0  # the rerun, in this process
    total, done = map(int, re.search(r"(\d+) units \((\d+) already done\)", capsys.readouterr().out).groups())
    assert 2 <= done <= total  # finished units were found, not tokenized again
    got = s3_digest(corpus, "killed/json")
    assert got == corpus.reference and not any(k.startswith("_work") for k in got)


# ------------------------------------------------------------------ storage and imports


def test_local_paths_refused_on_a_multi_node_cluster(cluster, corpus, tmp_path, capsys):
    arith = ["--dataset", "arithmetic", "--n_train", "100", "--n_val", "10", "--executor", "ray",
             "--address", cluster.address]
    assert main([*arith, "--data_root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--data_root '{tmp_path / 'out'}' is a local path" in err, err
    assert "2 nodes" in err and "object storage" in err and not (tmp_path / "out").exists()
    local = write_jsonl(str(tmp_path / "d.jsonl"), ["a b c"])
    assert main(ray_args(cluster, corpus, "--dataset", "json", "--data_files", local, "--tokenizer", "char",
                         "--data_root", f"{corpus.url}/refused")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--data_files '{local}' is a local path" in err, err
    assert s3_digest(corpus, "refused") == {}  # nothing written


@pytest.mark.slow
def test_bad_record_in_a_task_is_one_line(cluster, corpus, docs, capsys):
    import s3fs

    lines = [json.dumps({"text": d}) for d in docs[:100]]
    lines[70] = json.dumps({"body": "no text field"})
    s3fs.S3FileSystem(**corpus.options).pipe_file(f"{corpus.url[5:]}/bad/d.jsonl", "\n".join(lines).encode())
    assert main(ray_args(cluster, corpus, "--dataset", "json", "--data_files", f"{corpus.url}/bad/d.jsonl",
                         "--tokenizer", "char", "--data_root", f"{corpus.url}/bad/out")) == 2
    err = capsys.readouterr().err.strip()  # a progress bar may come first when the job ran for seconds
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == err.splitlines()[-1:] and "Traceback" not in err, err
    assert f"--data_files {corpus.url}/bad/d.jsonl (bytes " in err and "no 'text' field with a string (fields: ['body'])" in err, err


def test_local_executor_never_imports_ray(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None  # any import of ray now fails\n"
        "from preprocess.cli import main\n"
        f"args = ['--dataset', 'arithmetic', '--n_train', '200', '--n_val', '20', '--data_root', {str(tmp_path)!r}]\n"
        "print(main(args), main(args + ['--name', 'r', '--executor', 'ray']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines()[-1] == "0 2", r.stdout + r.stderr
    assert "error: --executor ray needs the ray package" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, expected", [
    (["--address", "127.0.0.1:6379"], "--address '127.0.0.1:6379': needs --executor ray"),
    (["--unit_size", "10"], "--unit_size 10: must be between 1024 bytes and 1 GiB"),
    (["--executor", "ray", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
])
def test_flag_errors_are_one_line(args, expected, tmp_path, capsys):
    assert main(["--dataset", "arithmetic", "--data_root", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------ the units and tasks themselves (no Ray)


def test_byte_ranges_read_every_line_once(tmp_path):
    """Blank lines, lines longer than a unit, no final newline: the units' documents are the file's."""
    from preprocess import units
    from preprocess.sources import text_source

    lines = [json.dumps({"text": f"doc {i} " + "x" * (i * 37 % 300)}) for i in range(200)]
    lines[50:50] = ["", "   "]
    lines[120] = json.dumps({"text": "long " * 2000})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    source = text_source("json", [str(path)], None)
    whole = [d.text for d in source]
    for unit_size in (1024, 4096, 100_000):
        plan = units.plan(source.files, source.reader, None, unit_size)
        assert plan == units.plan(source.files, source.reader, None, unit_size)  # a pure function of the inputs
        got = [d.text for u in plan for d in units.read(u, source.reader, None)]
        assert got == whole and len(plan) == -(-path.stat().st_size // unit_size)


def test_tasks_run_twice_write_the_same_bytes(tmp_path, docs, gpt2_tokenizer_dir, monkeypatch):
    """A retried or duplicated task finds its work done, or redoes it into the same bytes; a damaged shard is
    written again."""
    from preprocess import phases, units
    from preprocess.sources import text_source
    from preprocess.tokenizer import load_tokenizer, pad_id, save_tokenizer
    from shards.summary import TOKENIZER_DIR

    out = tmp_path / "out"
    tok = load_tokenizer(gpt2_tokenizer_dir)
    save_tokenizer(tok, str(out / TOKENIZER_DIR))
    source = text_source("json", [write_jsonl(str(tmp_path / "d.jsonl"), docs[:300])], None)
    spec = phases.Spec(out=str(out), storage_options=None, kind="text", pack=True, fmt="arrow", cmp_len=8, seq_len=56,
                       dtype="uint16", eos_id=tok.eos_token_id, pad_id=pad_id(tok), tokenizer_sha="t", columns=(),
                       shard_size=20000, seed=0, val_frac=0.2, reader=source.reader)
    plan = units.plan(source.files, source.reader, None, 8192)
    facts = [phases.tokenize_unit(spec, u) for u in plan]
    first = tree_digest(str(out))
    again = phases.tokenize_unit(spec, plan[1])
    assert again.skipped and np.array_equal(again.lengths, facts[1].lengths)
    for path in phases.unit_paths(spec, 1):
        os.remove(path)
    assert not phases.tokenize_unit(spec, plan[1]).skipped and tree_digest(str(out)) == first

    _, tasks = phases.plan_shards(facts, spec, None)
    infos = [phases.write_shard(spec, t) for t in tasks]
    written = tree_digest(str(out))
    assert all(not skipped for _, skipped in infos)
    assert all(skipped for _, skipped in (phases.write_shard(spec, t) for t in tasks))
    os.remove(phases.marker_path(spec, tasks[0].split, tasks[0].index))
    shard = out / infos[1][0].path
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: the marker no longer matches
    assert not phases.write_shard(spec, tasks[0])[1] and not phases.write_shard(spec, tasks[1])[1]
    assert tree_digest(str(out)) == written

    # shards that span many units read gathered documents instead: the same shards
    monkeypatch.setattr(phases, "GATHER_UNITS", 2)
    _, gathered = phases.plan_shards(facts, spec, None)
    gathers = [g for t in gathered for g in t.gathers]
    assert len(gathers) > len(gathered) and [t.units for t in gathered] == [t.units for t in tasks]
    shutil.rmtree(out / "_work" / phases.SHARDS_DIR)
    assert not any(phases.gather(spec, g) for g in gathers) and all(phases.gather(spec, g) for g in gathers)
    assert all(not skipped for _, skipped in (phases.write_shard(spec, t) for t in gathered))
    assert {k: v for k, v in tree_digest(str(out)).items() if "gather" not in k} == written
