"""Shared fixtures: a real S3-compatible server on 127.0.0.1, a real GPT-2 tokenizer, tiny shard datasets."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

S3_KEY, S3_SECRET = "testing-key", "testing-secret"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in this process, on a free port of 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_options(endpoint: str) -> dict:
    """storage_options for the test server. A socket read that stalls for 5 s fails and is retried (botocore
    waits 60 s by default), so one stuck response from the in-process server costs seconds, not the test."""
    return {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": endpoint},
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 5}}


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields (url prefix "s3://bucket", storage_options for fsspec)."""
    import s3fs

    opts = s3_options(s3_server)
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}", opts


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> str:
    from tests.assets import build_gpt2_tokenizer

    return build_gpt2_tokenizer(str(tmp_path_factory.mktemp("gpt2")))


def write_dataset(
    url: str,
    n_samples: dict[str, int],
    *,
    cmp_len: int = 4,
    seq_len: int = 12,
    fmt: str = "arrow",
    samples_per_shard: int = 10,
    vocab_size: int = 1000,
    with_label: bool = False,
    storage_options: dict | None = None,
    content: str = "ids",
) -> None:
    """A dataset folder in the real format, shards of a fixed sample count.

    content "ids": sample i of a split has all tokens = i % vocab, so readers can check exactly-once delivery
    from the tokens themselves. content "arithmetic": padded-layout arithmetic windows (tests/synthetic.py)
    with a character tokenizer in `tokenizer/`, for the trainer.
    """
    from tests import synthetic

    if content == "arithmetic":
        vocab_size = synthetic.VOCAB
    from shards import ShardWriter, SplitInfo, formats, save_manifest, storage
    from shards.manifest import Manifest, token_dtype

    fs, root = storage.open_fs(url, storage_options)
    window, dtype = cmp_len + seq_len, token_dtype(vocab_size)
    splits = {}
    per_sample = formats.bytes_per_sample(fmt, window, np.dtype(dtype).itemsize, int(with_label))
    for split, n in n_samples.items():
        info = SplitInfo()
        writer = ShardWriter(
            fs, root, split, fmt, window, dtype, ["label"] if with_label else [],
            shard_size=samples_per_shard * per_sample, on_commit=lambda s, _st, info=info: info.shards.append(s),
        )
        ids = np.arange(n)
        if content == "arithmetic":
            tokens = synthetic.arithmetic_rows(n, cmp_len, seq_len, seed=len(splits)).astype(dtype)
        else:
            tokens = np.repeat((ids % vocab_size)[:, None], window, axis=1)
        writer.add(
            tokens,
            {"label": ids % 2} if with_label else {},
            np.zeros((n, 1), dtype=np.int64),
        )
        writer.close()
        info.windows = info.documents = n
        info.tokens = n * window
        splits[split] = info
    arith = content == "arithmetic"
    if arith:
        storage.upload_dir(fs, synthetic.save_tokenizer(), storage.join(root, "tokenizer"))
    m = Manifest(
        name="synthetic", format=fmt, cmp_len=cmp_len, seq_len=seq_len, dtype=dtype, vocab_size=vocab_size,
        pad_id=0, eos_id=synthetic.EOS if arith else 1, separator_ids=[synthetic.SEP],
        layout="padded" if arith else "packed", columns={"label": "int64"} if with_label else {},
        tokenizer={"name": "none", "sha256": "", "path": "tokenizer"}, params={}, splits=splits,
        package_version="test", answers=arith,
    )
    save_manifest(fs, root, m)


def arithmetic_root(tmp_path_factory, train: int, val: int) -> str:
    """A data_root whose dataset `arith` holds arithmetic windows (cmp_len 16, seq_len 32): the trainer's tests."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(str(root / "arith"), {"train": train, "val": val}, cmp_len=16, seq_len=32, content="arithmetic",
                  samples_per_shard=100)
    return str(root)


@pytest.fixture
def make_dataset():
    return write_dataset
