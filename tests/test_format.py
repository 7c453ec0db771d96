"""The shard format on its own: round trips, determinism, verification of damaged shards, S3."""
import numpy as np
import pytest

from shards import formats, load_manifest, storage
from shards.__main__ import main as shards_main
from shards.verify import VerifyError, verify


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_roundtrip_and_determinism(fmt):
    tokens = np.arange(60, dtype=np.uint16).reshape(5, 12)
    extras = {"label": np.array([0, 1, 1, 0, 1])}
    data = formats.encode(fmt, tokens, extras, first_id=7)
    assert data == formats.encode(fmt, tokens, extras, first_id=7)
    out = formats.decode(fmt, data)
    assert out["input_ids"].dtype == np.uint16
    np.testing.assert_array_equal(out["input_ids"], tokens)
    np.testing.assert_array_equal(out["label"], extras["label"])


def test_arrow_shard_on_disk_decodes_as_a_memory_map(tmp_path):
    """Readers rely on this: a local Arrow shard is read in place, never copied into the heap whole."""
    import pyarrow as pa

    tokens = np.arange(4096, dtype=np.uint16).reshape(4, 1024)
    path = tmp_path / "x.arrow"
    path.write_bytes(formats.encode("arrow", tokens, {"label": np.array([0, 1, 1, 0])}, first_id=0))
    before = pa.total_allocated_bytes()
    out = formats.decode("arrow", str(path))
    assert pa.total_allocated_bytes() == before
    np.testing.assert_array_equal(out["input_ids"], tokens)


def test_stock_webdataset_reads_our_tars(tmp_path):
    import webdataset as wds

    tokens = np.arange(24, dtype=np.uint32).reshape(3, 8)
    path = tmp_path / "x.tar"
    path.write_bytes(formats.encode("webdataset", tokens, {"label": np.array([1, 0, 1])}, first_id=10))
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["0000000010", "0000000011", "0000000012"]
    np.testing.assert_array_equal(np.stack([s["input_ids.npy"] for s in samples]), tokens)
    assert [s["label.cls"] for s in samples] == [1, 0, 1]


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_verify_names_the_bad_shard(tmp_path, make_dataset, fmt, capsys):
    make_dataset(str(tmp_path), {"train": 25, "val": 5}, fmt=fmt)
    fs, root = storage.open_fs(str(tmp_path))
    m = load_manifest(fs, root)
    assert verify(fs, root, m) == {"train": 25, "val": 5}
    assert shards_main(["verify", str(tmp_path)]) == 0
    bad = tmp_path / m.splits["train"].shards[1].path
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(VerifyError, match="shard-00001"):
        verify(fs, root, m)
    assert shards_main(["verify", str(tmp_path)]) == 1
    assert "shard-00001" in capsys.readouterr().err
    bad.unlink()
    with pytest.raises(VerifyError, match="shard-00001.*missing"):
        verify(fs, root, m)


def test_dataset_on_s3(s3_bucket, make_dataset):
    url, opts = s3_bucket
    make_dataset(f"{url}/ds", {"train": 12}, fmt="arrow", storage_options=opts)
    fs, root = storage.open_fs(f"{url}/ds", opts)
    m = load_manifest(fs, root)
    assert verify(fs, root, m) == {"train": 12}
    assert [s.samples for s in m.splits["train"].shards] == [10, 2]


def test_version_1_manifests_are_read_with_answers_inferred(tmp_path, make_dataset):
    """Format 2 added `answers`; before it only arithmetic data had final answers."""
    import json

    make_dataset(str(tmp_path / "d"), {"train": 10}, cmp_len=2, seq_len=4)
    path = tmp_path / "d" / "manifest.json"
    for dataset, answers in (("arithmetic", True), ("glue", False)):
        d = json.loads(path.read_text())
        d.pop("answers", None)
        d.update(format_version=1, params={"dataset": dataset})
        path.write_text(json.dumps(d))
        m = load_manifest(*storage.open_fs(str(tmp_path / "d")))
        assert m.answers is answers and m.format_version == 2
