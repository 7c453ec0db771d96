"""Shard encodings: Arrow IPC and WebDataset tar, both holding fixed-length token windows.

A shard is encoded in memory and written in one atomic put. Decoding returns numpy arrays: `input_ids`
as one (samples, window) array (a zero-copy view for Arrow) plus any extra columns. Both encodings are
byte-deterministic (no timestamps, owners or random names) so reruns produce identical files.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa

TOKENS = "input_ids"


class ShardFormatError(ValueError):
    """A shard could not be decoded; the message names it."""


# ---------------------------------------------------------------- Arrow IPC


def encode_arrow(input_ids: np.ndarray, extras: dict[str, np.ndarray]) -> bytes:
    n, window = input_ids.shape
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(input_ids.reshape(-1)), window)
    columns = {TOKENS: tokens, **{k: pa.array(v) for k, v in extras.items()}}
    batch = pa.RecordBatch.from_pydict(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_arrow(source: bytes | str, name: str = "shard") -> dict[str, np.ndarray]:
    """Decode from bytes or, for a local path, a memory map (no copy of the token data)."""
    try:
        buf = pa.memory_map(source) if isinstance(source, str) else pa.BufferReader(source)
        table = pa.ipc.open_file(buf).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardFormatError(f"{name}: not a readable Arrow IPC file ({e})") from e
    if TOKENS not in table.column_names:
        raise ShardFormatError(f"{name}: no {TOKENS!r} column (columns: {table.column_names})")
    col = _one_chunk(table.column(TOKENS))
    window = col.type.list_size
    out = {TOKENS: _numpy_view(col.values).reshape(-1, window)}
    for c in table.column_names:
        if c != TOKENS:
            out[c] = _numpy_view(_one_chunk(table.column(c)))
    return out


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    """Our shards hold one record batch. `combine_chunks` copies even a single chunk, which would turn a
    memory map into a heap copy of the whole shard."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _numpy_view(arr: pa.Array) -> np.ndarray:
    """The array's data buffer as numpy, without copying. pyarrow's own `to_numpy` imports pandas on first
    use (0.5 s per reader process); our columns are fixed-width and never null, so the buffer is the data."""
    if arr.null_count or not pa.types.is_integer(arr.type):
        return arr.to_numpy(zero_copy_only=False)
    dtype = np.dtype(arr.type.to_pandas_dtype())
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


# ---------------------------------------------------------------- WebDataset tar


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _npy_bytes(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, a, allow_pickle=False)
    return f.getvalue()


def encode_webdataset(input_ids: np.ndarray, extras: dict[str, np.ndarray], first_id: int) -> bytes:
    """One sample per key (its sample id), `.input_ids.npy` plus `.<column>.cls` for integer columns:
    the layout that stock `webdataset` decodes without custom handlers."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(input_ids):
            key = f"{first_id + i:010d}"
            _tar_member(tar, f"{key}.{TOKENS}.npy", _npy_bytes(row))
            for col, values in extras.items():
                _tar_member(tar, f"{key}.{col}.cls", str(int(values[i])).encode())
    return out.getvalue()


def decode_webdataset(source: bytes, name: str = "shard") -> dict[str, np.ndarray]:
    rows: list[np.ndarray] = []
    extras: dict[str, list[int]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(source), mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext == f"{TOKENS}.npy":
                    rows.append(np.load(io.BytesIO(data), allow_pickle=False))
                elif ext.endswith(".cls"):
                    extras.setdefault(ext[: -len(".cls")], []).append(int(data))
    except (tarfile.TarError, ValueError, EOFError, OSError) as e:
        raise ShardFormatError(f"{name}: not a readable WebDataset tar ({e})") from e
    if not rows:
        raise ShardFormatError(f"{name}: no samples found")
    out = {TOKENS: np.stack(rows)}
    for col, values in extras.items():
        if len(values) != len(rows):
            raise ShardFormatError(f"{name}: column {col!r} has {len(values)} values for {len(rows)} samples")
        out[col] = np.asarray(values, dtype=np.int64)
    return out


def encode(fmt: str, input_ids: np.ndarray, extras: dict[str, np.ndarray], first_id: int) -> bytes:
    return encode_arrow(input_ids, extras) if fmt == "arrow" else encode_webdataset(input_ids, extras, first_id)


def decode(fmt: str, source: bytes | str, name: str = "shard") -> dict[str, np.ndarray]:
    if fmt == "arrow":
        return decode_arrow(source, name)
    if isinstance(source, str):
        with open(source, "rb") as f:
            source = f.read()
    return decode_webdataset(source, name)


def bytes_per_sample(fmt: str, window: int, itemsize: int, n_extras: int) -> int:
    """Encoded size of one sample, used to cut shards at a byte budget deterministically."""
    if fmt == "arrow":
        return window * itemsize + 8 * n_extras
    # tar: a 512-byte header per member, data padded to 512 bytes, npy header of 128 bytes
    npy = 512 + -(-(128 + window * itemsize) // 512) * 512
    return npy + n_extras * 1024
