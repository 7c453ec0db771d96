"""preprocess end to end: real tokenizers, real worker processes, the real S3 server, kills and resumes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from preprocess.arithmetic import ArithmeticParams, generate, solve
from preprocess.cli import main
from preprocess.pipeline import PROGRESS_NAME
from shards import formats, load_manifest, storage
from shards.verify import verify
from tests.assets import english_like_docs, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def read_split(url: str, split: str, storage_options=None) -> dict[str, np.ndarray]:
    fs, root = storage.open_fs(url, storage_options)
    m = load_manifest(fs, root)
    parts = [formats.decode(m.format, storage.read_bytes(fs, storage.join(root, s.path))) for s in m.splits[split].shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list[str]]:
    docs = english_like_docs(600, seed=3, mean_words=120)
    path = str(tmp_path_factory.mktemp("corpus") / "docs.jsonl")
    return write_jsonl(path, docs), docs


def text_args(corpus_path: str, tok: str, root: str, *extra: str) -> list[str]:
    return ["--dataset", "json", "--data_files", corpus_path, "--tokenizer", tok, "--data_root", root,
            "--cmp_len", "8", "--seq_len", "56", "--shard_size", "20000", "--val_frac", "0.2", *extra]


# ------------------------------------------------------------------ arithmetic


def test_arithmetic_steps_are_equalities():
    rng_params = ArithmeticParams(n_train=300, n_val=50, min_ents=2, max_ents=4, max_num=5000, p_mult=0.3)
    for _, problem, solution in generate(rng_params, seed=1):
        answer = eval(problem)
        steps = solution.split("=")
        assert all(eval(s) == answer for s in steps), (problem, solution)
        assert steps[-1] == str(answer)
    assert solve([802, 203]) == ["2+800+203", "3+2+800+200", "5+800+200", "805+200", "1005"]


def test_arithmetic_operand_options():
    """The paper's task: a third operand with a given probability, sums up to 5,000, products of single digits."""
    p = ArithmeticParams(n_train=3000, n_val=100, min_ents=2, max_ents=3, p_more_ents=0.25, max_num=5001,
                         p_mult=0.5, max_mult_num=8, max_mult_left=8)
    problems = [problem.split("+") for _, problem, _ in generate(p, seed=2)]
    assert abs(sum(len(t) == 3 for t in problems) / len(problems) - 0.25) < 0.03
    terms = [t for terms in problems for t in terms]
    products = [tuple(map(int, t.split("*"))) for t in terms if "*" in t]
    assert abs(len(products) / len(terms) - 0.5) < 0.03 and max(max(f) for f in products) == 7
    assert max(int(t) for t in terms if "*" not in t) > 4900


def test_arithmetic_val_never_in_train(tmp_path):
    assert main(["--dataset", "arithmetic", "--data_root", str(tmp_path), "--n_train", "3000", "--n_val", "300",
                 "--max_num", "30", "--cmp_len", "8", "--seq_len", "40"]) == 0
    m = load_manifest(*storage.open_fs(str(tmp_path / "arithmetic")))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "arithmetic" / "tokenizer"))
    problems = {}
    for split in ("train", "val"):
        ids = read_split(str(tmp_path / "arithmetic"), split)["input_ids"]
        problems[split] = {tok.decode(r[: m.cmp_len], skip_special_tokens=True) for r in ids}
        row = ids[0]
        # cmp part: left padding then the problem and its '='; seq part: the steps, eos, right padding
        assert row[0] == m.pad_id and row[m.cmp_len - 1] == m.separator_ids[0]
        text = tok.decode(row[m.cmp_len:], skip_special_tokens=True)
        problem = tok.decode(row[: m.cmp_len], skip_special_tokens=True)[:-1]
        assert int(text.split("=")[-1]) == eval(problem)
    assert problems["val"] and not problems["val"] & problems["train"]
    assert m.splits["val"].documents == 300 and m.layout == "padded" and m.answers
    total = m.splits["train"].windows + m.splits["train"].too_long
    assert total == 3000


def test_too_long_pairs_are_counted_not_cut(tmp_path, capsys):
    assert main(["--dataset", "arithmetic", "--data_root", str(tmp_path), "--n_train", "400", "--n_val", "20",
                 "--cmp_len", "16", "--seq_len", "60"]) == 0
    m = load_manifest(*storage.open_fs(str(tmp_path / "arithmetic")))
    s = m.splits["train"]
    assert 0 < s.too_long < 400 and s.windows == 400 - s.too_long and s.tokens_dropped > 0
    assert "too long" in capsys.readouterr().out
    assert verify(*storage.open_fs(str(tmp_path / "arithmetic")), m)


# ------------------------------------------------------------------ text


def test_packing_keeps_every_token_in_order(tmp_path, corpus, gpt2_tokenizer_dir):
    path, docs = corpus
    assert main(text_args(path, gpt2_tokenizer_dir, str(tmp_path))) == 0
    from transformers import AutoTokenizer

    from preprocess.pipeline import split_codes

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    codes = split_codes(np.arange(len(docs)), 0, 0.2)
    m = load_manifest(*storage.open_fs(str(tmp_path / "json")))
    for code, split in enumerate(("train", "val")):
        stream = [t for d, c in zip(docs, codes) if c == code for t in tok(d)["input_ids"] + [tok.eos_token_id]]
        got = read_split(str(tmp_path / "json"), split)["input_ids"].reshape(-1)
        assert len(stream) - len(got) < m.window  # only the tail is dropped
        assert got.tolist() == stream[: len(got)]
        info = m.splits[split]
        assert info.documents == int((codes == code).sum())
        assert info.tokens == len(stream) and info.tokens_dropped == len(stream) - len(got)
    assert m.layout == "packed" and m.dtype == "uint16" and m.eos_id == tok.eos_token_id
    assert tok.convert_tokens_to_ids(".") in m.separator_ids and tok.convert_tokens_to_ids("the") not in m.separator_ids
    from transformers import AutoTokenizer as Auto

    assert Auto.from_pretrained(str(tmp_path / "json" / "tokenizer"))("Hello world")["input_ids"] == [15496, 995]


def test_output_identical_for_any_process_count(tmp_path, corpus, gpt2_tokenizer_dir):
    path, _ = corpus
    digests = []
    for n in (1, 2, 3):
        root = str(tmp_path / f"p{n}")
        assert main(text_args(path, gpt2_tokenizer_dir, root, "--n_data_procs", str(n))) == 0
        digests.append(tree_digest(root))
    assert digests[0] == digests[1] == digests[2]
    assert sum(k.endswith(".arrow") for k in digests[0]) > 4


def test_no_pack_layout(tmp_path, corpus, gpt2_tokenizer_dir):
    path, docs = corpus
    assert main(text_args(path, gpt2_tokenizer_dir, str(tmp_path), "--no_pack", "--val_frac", "0")) == 0
    m = load_manifest(*storage.open_fs(str(tmp_path / "json")))
    ids = read_split(str(tmp_path / "json"), "train")["input_ids"]
    assert len(ids) == len(docs) == m.splits["train"].documents and m.layout == "padded"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    for doc, row in zip(docs, ids):
        tokens = (tok(doc)["input_ids"] + [tok.eos_token_id])[: m.window]
        if len(tokens) >= m.cmp_len:  # shorter documents are left-padded into the compression part instead
            assert row.tolist() == tokens + [m.pad_id] * (m.window - len(tokens))
    assert m.splits["train"].tokens_dropped > 0


def test_uint32_vocabulary(tmp_path, corpus, gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tok.add_tokens([f"<extra_{i}>" for i in range(16000)])
    big = str(tmp_path / "bigtok")
    tok.save_pretrained(big)
    docs = ["hello <extra_15999> world." * 5, "<extra_15000> again"]
    path = write_jsonl(str(tmp_path / "d.jsonl"), docs)
    assert main(["--dataset", "json", "--data_files", path, "--tokenizer", big, "--data_root", str(tmp_path),
                 "--cmp_len", "4", "--seq_len", "4", "--val_frac", "0"]) == 0
    m = load_manifest(*storage.open_fs(str(tmp_path / "json")))
    ids = read_split(str(tmp_path / "json"), "train")["input_ids"]
    assert m.dtype == "uint32" and ids.dtype == np.uint32 and int(ids.max()) >= 1 << 16


def test_webdataset_format_reads_with_stock_webdataset(tmp_path, corpus, gpt2_tokenizer_dir):
    import webdataset as wds

    path, _ = corpus
    assert main(text_args(path, gpt2_tokenizer_dir, str(tmp_path / "a"))) == 0
    assert main(text_args(path, gpt2_tokenizer_dir, str(tmp_path / "w"), "--format", "webdataset")) == 0
    arrow = read_split(str(tmp_path / "a" / "json"), "train")["input_ids"]
    m = load_manifest(*storage.open_fs(str(tmp_path / "w" / "json")))
    urls = [str(tmp_path / "w" / "json" / s.path) for s in m.splits["train"].shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    np.testing.assert_array_equal(np.stack([s["input_ids.npy"] for s in samples]), arrow)
    assert [int(s["__key__"]) for s in samples] == list(range(len(arrow)))
    assert verify(*storage.open_fs(str(tmp_path / "w" / "json")), m)


def test_text_files_and_parquet_sources(tmp_path, gpt2_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = english_like_docs(20, seed=5, mean_words=40)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    results = []
    for dataset, files in (("text", str(tmp_path / "txt" / "*.txt")), ("parquet", str(tmp_path / "d.parquet"))):
        assert main(["--dataset", dataset, "--data_files", files, "--tokenizer", gpt2_tokenizer_dir,
                     "--data_root", str(tmp_path / dataset), "--cmp_len", "8", "--seq_len", "24", "--val_frac", "0"]) == 0
        results.append(read_split(str(tmp_path / dataset / dataset), "train")["input_ids"])
    np.testing.assert_array_equal(results[0], results[1])  # one document per file == one row per document


def test_glue_from_local_files(tmp_path, gpt2_tokenizer_dir):
    rows = {
        "train": [{"sentence1": "He said hello.", "sentence2": "He greeted.", "label": 1, "idx": 0},
                  {"sentence1": "A cat sat.", "sentence2": "A dog ran far away " * 20, "label": 0, "idx": 1},
                  {"sentence1": "It rains.", "sentence2": "Water falls.", "label": 1, "idx": 2}],
        "validation": [{"sentence1": "Hi.", "sentence2": "Hello.", "label": 0, "idx": 0}],
    }
    files = []
    for split, recs in rows.items():
        p = tmp_path / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        files.append(f"{split}={p}")
    assert main(["--dataset", "glue", "--data_files", *files, "--tokenizer", gpt2_tokenizer_dir,
                 "--data_root", str(tmp_path), "--cmp_len", "8", "--seq_len", "8"]) == 0
    m = load_manifest(*storage.open_fs(str(tmp_path / "glue")))
    train = read_split(str(tmp_path / "glue"), "train")
    assert m.splits["train"].too_long == 1 and m.columns == {"label": "int64"} and not m.answers
    assert train["label"].tolist() == [1, 1] and m.splits["val"].windows == 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    s1 = tok("He said hello.")["input_ids"]
    assert train["input_ids"][0, 8 - len(s1): 8].tolist() == s1 and train["input_ids"][0, 0] == m.pad_id


# ------------------------------------------------------------------ reruns, resume, storage


def test_rerun_is_noop_and_other_params_refused(tmp_path, corpus, gpt2_tokenizer_dir, capsys):
    path, _ = corpus
    args = text_args(path, gpt2_tokenizer_dir, str(tmp_path))
    assert main(args) == 0
    before = tree_digest(str(tmp_path))
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out and tree_digest(str(tmp_path)) == before
    assert main(args[:-6] + ["--seq_len", "40", "--shard_size", "20000", "--val_frac", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "seq_len (56 -> 40)" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert tree_digest(str(tmp_path)) == before
    assert main(args[:-6] + ["--seq_len", "40", "--shard_size", "20000", "--val_frac", "0.2", "--overwrite"]) == 0
    assert load_manifest(*storage.open_fs(str(tmp_path / "json"))).seq_len == 40


def test_crash_after_some_shards_then_resume_gives_identical_output(tmp_path, corpus, gpt2_tokenizer_dir, monkeypatch,
                                                                    capsys):
    path, _ = corpus
    reference = str(tmp_path / "ref")
    assert main(text_args(path, gpt2_tokenizer_dir, reference)) == 0
    from preprocess import pipeline

    original = pipeline.Run._committed
    calls = {"n": 0}

    def crash_after_three(self, *a):
        original(self, *a)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Run, "_committed", crash_after_three)
    resumed = str(tmp_path / "res")
    assert main(text_args(path, gpt2_tokenizer_dir, resumed)) == 130
    assert os.path.exists(os.path.join(resumed, "json", PROGRESS_NAME))
    assert not os.path.exists(os.path.join(resumed, "json", "manifest.json"))
    monkeypatch.setattr(pipeline.Run, "_committed", original)
    capsys.readouterr()
    assert main(text_args(path, gpt2_tokenizer_dir, resumed)) == 0
    assert tree_digest(resumed) == tree_digest(reference)
    skipped = int(re.search(r"resumed: (\d+) documents were already in shards", capsys.readouterr().out).group(1))
    assert 0 < skipped < len(corpus[1])  # documents already in shards were read but not tokenized again


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_output(tmp_path, gpt2_tokenizer_dir):
    docs = english_like_docs(4000, seed=9, mean_words=150)
    path = write_jsonl(str(tmp_path / "big.jsonl"), docs)
    args = text_args(path, gpt2_tokenizer_dir, "ROOT", "--n_data_procs", "2", "--shard_size", "8000")
    env = {**os.environ, "PYTHONPATH": REPO}
    ref = str(tmp_path / "ref")
    subprocess.run([sys.executable, "-m", "preprocess", *[ref if a == "ROOT" else a for a in args]],
                   check=True, env=env, capture_output=True)
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "preprocess", *[killed if a == "ROOT" else a for a in args]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    progress = os.path.join(killed, "json", PROGRESS_NAME)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(progress) and len(json.load(open(progress))["splits"]["train"]["shards"]) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: make the corpus bigger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "json", "manifest.json"))
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert tree_digest(killed) == tree_digest(ref)


def test_s3_output_and_no_credentials_written(tmp_path, s3_bucket, corpus, gpt2_tokenizer_dir):
    url, opts = s3_bucket
    path, _ = corpus
    args = text_args(path, gpt2_tokenizer_dir, f"{url}/data", "--storage_options", json.dumps(opts), "--n_data_procs", "2")
    assert main(args) == 0
    local = str(tmp_path / "local")
    assert main(text_args(path, gpt2_tokenizer_dir, local)) == 0
    fs, root = storage.open_fs(f"{url}/data/json", opts)
    m = load_manifest(fs, root)
    assert verify(fs, root, m)
    for rel, digest in tree_digest(os.path.join(local, "json")).items():
        data = fs.cat_file(f"{root}/{rel}")
        assert hashlib.sha256(data).hexdigest() == digest, rel
        assert opts["secret"].encode() not in data and opts["key"].encode() not in data
    from shards.__main__ import main as shards_main

    assert shards_main(["verify", f"{url}/data/json", "--storage_options", json.dumps(opts)]) == 0


# ------------------------------------------------------------------ errors: one line, non-zero, nothing left


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dataset", "json", "--data_files", "/nonexistent/*.jsonl"], "matches no file"),
        (["--dataset", "json"], "needs --data_files"),
        (["--dataset", "openwebtext", "--tokenizer", "char"], "--data_files"),
        (["--dataset", "glue", "--tokenizer", "char"], "--data_files"),
        (["--dataset", "arithmetic", "--cmp_len", "0"], "--cmp_len 0"),
        (["--dataset", "arithmetic", "--tokenizer", "/nonexistent/tok"], "cannot load tokenizer '/nonexistent/tok'"),
        (["--dataset", "json", "--data_files", "x.jsonl", "--tokenizer", "gpt2"], "tokenizer 'gpt2'"),
        (["--dataset", "arithmetic", "--config", "/nonexistent.json"], "--config /nonexistent.json"),
        (["--dataset", "arithmetic", "--n_val", "500", "--max_num", "3", "--max_ents", "2"], "distinct problems"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, args, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    assert main(args + ["--data_root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not any(f == "manifest.json" for _, _, fs in os.walk(tmp_path / "out") for f in fs)


def test_unknown_dataset_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", "wikitext"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "invalid choice: 'wikitext'" in err and len(err.splitlines()) == 1


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dataset": "arithmetic", "data_root": str(tmp_path), "n_train": 50, "n_val": 10,
                               "cmp_len": 16, "seq_len": 300, "lr": 0.001, "exp_name": "trainer keys are ignored"}))
    assert main(["--config", str(cfg), "--seq_len", "280"]) == 0
    m = load_manifest(*storage.open_fs(str(tmp_path / "arithmetic")))
    assert m.seq_len == 280 and m.splits["train"].documents == 50


def test_reads_data_files_from_s3(tmp_path, s3_bucket, corpus, gpt2_tokenizer_dir):
    import s3fs

    url, opts = s3_bucket
    path, _ = corpus
    s3fs.S3FileSystem(**opts).put_file(path, f"{url[5:]}/raw/docs.jsonl")
    args = text_args(f"{url}/raw/*.jsonl", gpt2_tokenizer_dir, str(tmp_path / "from_s3"),
                     "--storage_options", json.dumps(opts))
    assert main(args) == 0
    assert main(text_args(path, gpt2_tokenizer_dir, str(tmp_path / "local"))) == 0
    a = read_split(str(tmp_path / "from_s3" / "json"), "train")["input_ids"]
    np.testing.assert_array_equal(a, read_split(str(tmp_path / "local" / "json"), "train")["input_ids"])


def test_readme_documents_every_flag():
    from preprocess.cli import build_parser

    readme = open(os.path.join(REPO, "README.md")).read()
    flags = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    missing = [f for f in flags if f"`{f}" not in readme]
    assert not missing, f"README.md does not document {missing}"
