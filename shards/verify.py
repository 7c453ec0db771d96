"""Check every shard of a dataset folder against its manifest: size, sha256, sample count and schema."""
from __future__ import annotations

import hashlib

import fsspec
import numpy as np

from shards import formats, storage
from shards.manifest import Manifest, ShardInfo


class VerifyError(ValueError):
    """A shard does not match the manifest; the message names the shard."""


def check_shard_size(info: ShardInfo, size: int, url: str) -> None:
    if size != info.bytes:
        raise VerifyError(f"{url}: {size} bytes, manifest says {info.bytes} (truncated or replaced)")


def check_shard_bytes(info: ShardInfo, data: bytes, url: str) -> None:
    """Size and checksum: cheap enough to run on every download, strong enough to catch truncation."""
    check_shard_size(info, len(data), url)
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise VerifyError(f"{url}: sha256 {digest[:12]}… does not match the manifest's {info.sha256[:12]}…")


def check_shard_arrays(
    m: Manifest, info: ShardInfo, arrays: dict[str, np.ndarray], url: str, scan_tokens: bool = True
) -> None:
    """Shape, dtype and columns are free to check; the vocabulary scan reads every token, so readers skip it."""
    tokens = arrays[formats.TOKENS]
    if tokens.shape != (info.samples, m.window):
        raise VerifyError(f"{url}: input_ids shape {tokens.shape}, expected ({info.samples}, {m.window})")
    if tokens.dtype != np.dtype(m.dtype):
        raise VerifyError(f"{url}: token dtype {tokens.dtype}, manifest says {m.dtype}")
    missing = set(m.columns) - set(arrays)
    if missing:
        raise VerifyError(f"{url}: missing columns {sorted(missing)}")
    if scan_tokens and tokens.size and int(tokens.max()) >= m.vocab_size:
        raise VerifyError(f"{url}: token id {int(tokens.max())} >= vocab_size {m.vocab_size}")


def verify(fs: fsspec.AbstractFileSystem, root: str, m: Manifest) -> dict[str, int]:
    """Raise VerifyError at the first bad shard; return samples per split when all are good."""
    counts = {}
    for split, info in m.splits.items():
        for shard in info.shards:
            path = storage.join(root, shard.path)
            url = storage.display_url(fs, path)
            try:
                data = storage.read_bytes(fs, path)
            except FileNotFoundError:
                raise VerifyError(f"{url}: missing") from None
            check_shard_bytes(shard, data, url)
            try:
                arrays = formats.decode(m.format, data, url)
            except formats.ShardFormatError as e:
                raise VerifyError(str(e)) from e
            check_shard_arrays(m, shard, arrays, url)
        if info.windows != info.samples:
            raise VerifyError(f"split {split}: manifest lists {info.windows} windows but its shards hold {info.samples}")
        counts[split] = info.samples
    return counts
