"""Work units of a split-up run (`--executor ray`): which documents each phase-1 task tokenizes.

The unit list is a pure function of the sorted input files, their sizes and `unit_size`, never of the cluster,
so any number of machines, retries and reruns agree on it:
  - a JSON-lines file (`json` builder, `.jsonl`, uncompressed) larger than `unit_size` is cut into fixed byte
    ranges [k * unit_size, (k + 1) * unit_size); a range owns the lines that *start* in it (a line that crosses
    the end belongs to its range; a range inside one long line owns nothing), so every line is read once;
  - any other file (parquet, .json, compressed, one-document text files, small jsonl) is read whole, and
    consecutive whole files are grouped until they reach `unit_size` (never across a GLUE split);
  - a source that is one stream (the Hub, the arithmetic generator) is staged by the driver: it cuts the stream
    into runs of documents holding at least `unit_size` characters and writes each run as an Arrow file.
Reading a unit yields exactly the documents the local executor reads there, in the same order: whole files go
through the same `datasets` builder (Reader.docs), byte ranges through pyarrow's JSON reader, the parser that
builder uses, and every record through the same Reader.doc checks.
"""
from __future__ import annotations

import codecs
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa

from preprocess.pipeline import SPLITS  # staged files store a split as its index here (-1: none)
from preprocess.sources import Doc, InputFile, Reader, SourceError
from shards import storage

FILES, LINES, STAGED = "files", "lines", "staged"
READ_AHEAD = 1 << 16  # bytes read past a range's end to find the end of its last line


@dataclass(frozen=True)
class Unit:
    index: int  # the unit's place in the input order: results are put in order by it, never by completion
    kind: str  # FILES, LINES or STAGED
    urls: tuple[str, ...]
    split: str | None = None  # glue files: the split of every record
    start: int = 0  # LINES: the lines of urls[0] that start in [start, stop)
    stop: int = 0
    size: int = 0  # LINES: the file's size


def splittable(reader: Reader, url: str) -> bool:
    """JSON lines can be cut anywhere at a line start; other formats are read whole."""
    return reader.builder == "json" and url.endswith(".jsonl")


def plan(files: Sequence[InputFile], reader: Reader, storage_options: dict | None, unit_size: int) -> list[Unit]:
    units: list[Unit] = []
    group: list[str] = []
    group_split: str | None = None
    group_bytes = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            units.append(Unit(len(units), FILES, tuple(group), group_split))
        group, group_bytes = [], 0

    for f in files:
        fs, path = storage.open_fs(f.url, storage_options)
        size = int(fs.info(path)["size"])  # after the glob that found the file, s3fs answers from its listing
        if splittable(reader, f.url) and size > unit_size:
            flush()
            for start in range(0, size, unit_size):
                units.append(Unit(len(units), LINES, (f.url,), f.split, start, min(start + unit_size, size), size))
            continue
        if group and f.split != group_split:
            flush()
        group.append(f.url)
        group_split, group_bytes = f.split, group_bytes + size
        if group_bytes >= unit_size:
            flush()
    flush()
    return units


def read(unit: Unit, reader: Reader | None, storage_options: dict | None) -> Iterator[Doc]:
    """The documents of one unit, in source order."""
    if unit.kind == FILES:
        yield from reader.docs([InputFile(u, unit.split) for u in unit.urls], storage_options)
    elif unit.kind == LINES:
        what = f"--data_files {unit.urls[0]} (bytes {unit.start}-{unit.stop})"
        for i, rec in enumerate(_json_lines(unit, storage_options, what)):
            yield reader.doc(rec, i, unit.split, what)
    else:
        yield from _read_staged(unit.urls[0], storage_options)


def _line_bytes(fs: fsspec.AbstractFileSystem, path: str, start: int, stop: int, size: int) -> bytes:
    """The lines that start in [start, stop): from the first line start >= start to the first one >= stop.
    A position p starts a line when p == 0 or byte p - 1 is a newline."""
    lo = max(start - 1, 0)
    data = fs.cat_file(path, start=lo, end=min(stop + READ_AHEAD, size))
    if start == 0:
        first = 0
    else:
        nl = data.find(b"\n")
        if nl < 0 or lo + nl + 1 >= stop:
            return b""  # no line starts in this range: it lies inside one long line
        first = nl + 1
    end = data.find(b"\n", stop - 1 - lo)
    while end < 0 and lo + len(data) < size:  # the last line runs past what was read
        more = fs.cat_file(path, start=lo + len(data), end=min(lo + len(data) + READ_AHEAD * 16, size))
        data += more
        end = data.find(b"\n", len(data) - len(more))
    return data[first : (end + 1 if end >= 0 else len(data))]


def _json_lines(unit: Unit, storage_options: dict | None, what: str) -> Iterator[dict]:
    import pyarrow.json as paj

    fs, path = storage.open_fs(unit.urls[0], storage_options)
    data = _line_bytes(fs, path, unit.start, unit.stop, unit.size)
    if unit.start == 0 and data.startswith(codecs.BOM_UTF8):  # as the datasets json builder does
        data = data[len(codecs.BOM_UTF8) :]
    if not data.strip():
        return
    try:  # one block, one thread: the task holds one CPU, and a block never splits a line
        table = paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(use_threads=False, block_size=len(data)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SourceError(f"cannot read {what} ({storage.first_line(e)}); each line must be one JSON object") from None
    yield from table.to_pylist()


# ---------------------------------------------------------------- staging a stream


def stage(docs: Iterable[Doc], fs: fsspec.AbstractFileSystem, folder: str, unit_size: int) -> Iterator[Unit]:
    """Cut a document stream into runs of at least `unit_size` characters and write each as an Arrow file
    (unless a previous run already did: the stream is deterministic). Yields each unit once its file exists."""
    buf: list[Doc] = []
    chars = index = 0
    for doc in docs:
        buf.append(doc)
        chars += len(doc.text) + len(doc.second)
        if chars >= unit_size:
            yield _write_staged(fs, folder, buf, index)
            buf, chars, index = [], 0, index + 1
    if buf:
        yield _write_staged(fs, folder, buf, index)


def _write_staged(fs: fsspec.AbstractFileSystem, folder: str, docs: list[Doc], index: int) -> Unit:
    path = storage.join(folder, f"{index:06d}.arrow")
    if not storage.exists(fs, path):
        table = pa.table({
            "text": pa.array([d.text for d in docs], pa.string()),
            "second": pa.array([d.second for d in docs], pa.string()),
            "label": pa.array([-1 if d.label is None else d.label for d in docs], pa.int64()),
            "split": pa.array([-1 if d.split is None else SPLITS.index(d.split) for d in docs], pa.int8()),
        })
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        storage.write_atomic(fs, path, sink.getvalue().to_pybytes())
    return Unit(index, STAGED, (storage.display_url(fs, path),))


def _read_staged(url: str, storage_options: dict | None) -> Iterator[Doc]:
    fs, path = storage.open_fs(url, storage_options)
    table = pa.ipc.open_file(pa.BufferReader(storage.read_bytes(fs, path))).read_all()
    splits = np.asarray(table.column("split"))
    for text, second, label, split in zip(*(table.column(c).to_pylist() for c in ("text", "second", "label")), splits):
        yield Doc(split=None if split < 0 else SPLITS[split], text=text, second=second,
                  label=None if label < 0 else label)
