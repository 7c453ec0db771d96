"""Human-readable views of a dataset folder: the manifest summary and decoded windows."""
from __future__ import annotations

import os
import tempfile

import fsspec
import numpy as np

from shards import formats, storage
from shards.manifest import Manifest

TOKENIZER_DIR = "tokenizer"


def summary_lines(m: Manifest, url: str) -> list[str]:
    lines = [
        f"{url}: {m.name} ({m.format}, format v{m.format_version}, package {m.package_version})",
        f"  window {m.window} = cmp_len {m.cmp_len} + seq_len {m.seq_len}, dtype {m.dtype}, vocab {m.vocab_size}, "
        f"pad {m.pad_id}, eos {m.eos_id}, {len(m.separator_ids)} separator ids, "
        f"{'one problem and its answer per window' if m.answers else 'no final answers'}",
        f"  tokenizer {m.tokenizer.get('name')} (sha256 {m.tokenizer.get('sha256', '')[:12]})",
    ]
    for name, s in m.splits.items():
        size = sum(x.bytes for x in s.shards)
        lines.append(
            f"  {name}: {s.samples} windows in {len(s.shards)} shards ({size / 1e6:.1f} MB), "
            f"{s.documents} documents, {s.tokens} tokens, {s.tokens_dropped} dropped, {s.too_long} too long"
        )
    return lines


def load_tokenizer(fs: fsspec.AbstractFileSystem, root: str):
    """The dataset's own tokenizer; remote folders are copied to a temporary local folder first."""
    from transformers import AutoTokenizer

    path = storage.join(root, TOKENIZER_DIR)
    if storage.is_local(fs):
        return AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        for remote in fs.ls(path, detail=False):
            with open(os.path.join(tmp, os.path.basename(remote)), "wb") as f:
                f.write(fs.cat_file(remote))
        return AutoTokenizer.from_pretrained(tmp)


def render_window(ids: np.ndarray, m: Manifest, tokenizer) -> str:
    """`[cmp] ‖ [seq]` with ` ¦ ` after each separator and runs of padding shown as a count."""
    seps = set(m.separator_ids)

    def render(part: np.ndarray) -> str:
        ids = part.tolist()
        is_pad = [t == m.pad_id for t in ids]
        lead = next((i for i, p in enumerate(is_pad) if not p), len(ids)) if m.layout == "padded" else 0
        end = len(ids)
        if m.layout == "padded" and m.pad_id != m.eos_id:
            while end > lead and is_pad[end - 1]:
                end -= 1
        out, seg = [], []
        for t in ids[lead:end]:
            seg.append(t)
            if t in seps:
                out.append(tokenizer.decode(seg))
                seg = []
        if seg:
            out.append(tokenizer.decode(seg))
        text = " ¦ ".join(repr(x)[1:-1] for x in out)
        return (f"<pad>x{lead} " if lead else "") + text + (f" <pad>x{len(ids) - end}" if end < len(ids) else "")

    return f"{render(ids[: m.cmp_len])} ‖ {render(ids[m.cmp_len:])}"


def decoded_lines(fs: fsspec.AbstractFileSystem, root: str, m: Manifest, split: str, n: int) -> list[str]:
    info = m.split(split)
    if n <= 0 or not info.shards:
        return []
    tokenizer = load_tokenizer(fs, root)
    lines = [f"first {n} windows of {split} ('‖' = cmp/seq boundary, '¦' = after a separator):"]
    sample_id = 0
    for shard in info.shards:
        arrays = formats.decode(m.format, storage.read_bytes(fs, storage.join(root, shard.path)), shard.path)
        for i, row in enumerate(arrays[formats.TOKENS]):
            extra = "".join(f" {c}={arrays[c][i]}" for c in m.columns)
            lines.append(f"  [{sample_id}]{extra} {render_window(row, m, tokenizer)}")
            sample_id += 1
            if sample_id >= n:
                return lines
    return lines
