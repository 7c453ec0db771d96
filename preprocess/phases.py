"""The two task kinds of a split-up run (`--executor ray`) and the plan between them, as plain functions.

Phase 1, one task per unit (units.py): tokenize it into `_work/units/NNNNNN.data` (tokens and per-document facts)
and then `NNNNNN.meta` (the facts alone: token count per document, and for pairs their split and whether they
fit). The meta file is written last, so its presence means the unit is done; a task that finds it returns the
facts without tokenizing.
Between the phases the driver takes prefix sums over the units, in unit order: of document counts (each
document's global index, hence its train/val split, exactly as the local executor numbers them) and of each
split's tokens or windows (window and shard boundaries). `plan_shards` turns them into one ShardTask per shard.
Phase 2, one task per shard: start the split's window assembler at the shard's first window (a resume state,
as windows.py defines them), feed it the covering units' documents of that split until the shard is full, write
it with ShardWriter, then `_work/shards/<split>-NNNNN.json` with its size and sha256. A task that finds that file
and a shard that matches it returns at once. A shard spanning more than GATHER_UNITS units reads its documents
from gather tasks run first, each pulling them out of a group of units into `_work/gather/`.
Every file is written atomically and is a function of the inputs alone, so a retried or duplicated task
writes the same bytes under the same name. Nothing here imports Ray: the executor only schedules these.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from preprocess import encode as enc
from preprocess.pipeline import (
    CHUNK_DOCS, SPLITS, WORK_DIR, assemble, batched, doc_chunk, make_assembler, pair_splits, select_text, split_codes,
)
from preprocess.sources import Reader
from preprocess.units import Unit, read
from shards import ShardInfo, ShardWriter, SplitInfo, storage
from shards.summary import TOKENIZER_DIR
from shards.verify import VerifyError, check_shard_bytes
from shards.writer import samples_per_shard

UNITS_DIR, SHARDS_DIR, STAGED_DIR, GATHER_DIR = "units", "shards", "staged", "gather"
# A shard task reads at most this many units itself. A split's documents are spread over every unit (val above
# all: a few shards, each spanning a third of the units), so a shard spanning more has gather tasks first pull
# its documents out of groups of this many units, in parallel; it then reads their much smaller outputs.
GATHER_UNITS = 64


@dataclass(frozen=True)
class Spec:
    """What every task needs to know about the job. It travels with each task, so it holds no arrays and no
    file lists; `storage_options` ride along in memory and are never written anywhere."""

    out: str  # the output folder, a local path or fsspec URL
    storage_options: dict | None
    kind: str  # "text" or "pair"
    pack: bool
    fmt: str
    cmp_len: int
    seq_len: int
    dtype: str
    eos_id: int
    pad_id: int
    tokenizer_sha: str
    columns: tuple[str, ...]
    shard_size: int
    seed: int
    val_frac: float
    reader: Reader | None  # file sources; None when the driver staged the stream

    @property
    def window(self) -> int:
        return self.cmp_len + self.seq_len

    def open(self):
        """(filesystem, output folder path); fsspec reuses one client per process."""
        return storage.open_fs(self.out, self.storage_options)

    def work(self, *parts: str) -> str:
        return storage.join(self.open()[1], WORK_DIR, *parts)


# ---------------------------------------------------------------- intermediate files


def dump_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one blob: a JSON line of names, then each array as .npy. No timestamps: same arrays,
    same bytes (np.savez would stamp its zip entries)."""
    out = io.BytesIO()
    out.write(json.dumps(list(arrays)).encode() + b"\n")
    for a in arrays.values():
        np.save(out, a, allow_pickle=False)
    return out.getvalue()


def load_arrays(data: bytes) -> dict[str, np.ndarray]:
    f = io.BytesIO(data)
    return {name: np.load(f, allow_pickle=False) for name in json.loads(f.readline())}


@dataclass
class UnitFacts:
    """What the driver plans with: a few bytes per document, never tokens."""

    index: int
    lengths: np.ndarray  # int64 tokens per document, eos included
    split: np.ndarray | None = None  # pair sources: int8 split code per document (text: assigned by index)
    ok: np.ndarray | None = None  # pair sources: the pair fits its window
    skipped: bool = False  # an earlier run had done this unit

    @property
    def documents(self) -> int:
        return len(self.lengths)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"lengths": self.lengths}
        if self.split is not None:
            out.update(split=self.split, ok=self.ok)
        return out


def unit_paths(spec: Spec, index: int) -> tuple[str, str]:
    return spec.work(UNITS_DIR, f"{index:06d}.data"), spec.work(UNITS_DIR, f"{index:06d}.meta")


def read_if_there(fs, path: str) -> bytes | None:
    """One GET whether or not the file exists (an exists() check costs two requests on S3, then the read)."""
    try:
        return storage.read_bytes(fs, path)
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- phase 1


_encoders: dict[str, enc.Encoder] = {}


def encoder_for(spec: Spec) -> enc.Encoder:
    """The job's tokenizer, fetched from the output folder once per worker process."""
    encoder = _encoders.get(spec.tokenizer_sha)
    if encoder is None:
        fs, root = spec.open()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tokenizer.json")
            with open(path, "wb") as f:
                f.write(storage.read_bytes(fs, storage.join(root, TOKENIZER_DIR, "tokenizer.json")))
            encoder = enc.Encoder(path, spec.eos_id, spec.pad_id, spec.cmp_len, spec.seq_len, spec.dtype)
            encoder.tokenizer  # load now: the file goes with the folder
        _encoders[spec.tokenizer_sha] = encoder
    return encoder


def _concat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    return np.concatenate(parts) if parts else empty


def tokenize_unit(spec: Spec, unit: Unit) -> UnitFacts:
    """Phase 1: tokenize one unit (or find it done) and return its facts."""
    fs, _ = spec.open()
    data_path, meta_path = unit_paths(spec, unit.index)
    meta = read_if_there(fs, meta_path)
    if meta is not None:
        return UnitFacts(unit.index, **load_arrays(meta), skipped=True)
    encoder = encoder_for(spec)
    results, splits, labels = [], [], []
    for docs in batched(read(unit, spec.reader, spec.storage_options), CHUNK_DOCS[spec.kind]):
        codes = pair_splits(docs) if spec.kind == "pair" else np.zeros(len(docs), np.int8)
        chunk = doc_chunk(docs, 0, codes)
        results.append(encoder.encode(spec.kind, chunk))
        splits.append(codes)
        labels.append(chunk.labels)
    dtype, i64 = np.dtype(spec.dtype), np.empty(0, np.int64)
    facts = UnitFacts(unit.index, _concat([r.lengths for r in results], i64))
    if spec.kind == "text":
        data = {"tokens": _concat([r.flat for r in results], np.empty(0, dtype))}
    else:
        facts.split = _concat(splits, np.empty(0, np.int8))
        facts.ok = _concat([r.ok for r in results], np.empty(0, bool))
        data = {"windows": _concat([r.windows for r in results], np.empty((0, spec.window), dtype)),
                "labels": _concat(labels, i64)}
    storage.write_atomic(fs, data_path, dump_arrays({**facts.arrays(), **data}))
    storage.write_atomic(fs, meta_path, dump_arrays(facts.arrays()))
    return facts


# ---------------------------------------------------------------- the plan between the phases


UnitSpan = tuple[int, int, int]  # (unit, global index of its first document, documents used)


@dataclass(frozen=True)
class GatherTask:
    """The documents of one split, from `start_doc` on, of up to GATHER_UNITS units, for one shard task."""

    split: str
    shard: int
    part: int
    start_doc: int
    units: tuple[UnitSpan, ...]


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int  # the shard's number in its split
    first_sample: int  # the split's index of its first window (WebDataset keys count from it)
    samples: int
    state: tuple[int, int, int, int]  # the assembler's resume state at the first window (windows.STATE_FIELDS)
    units: tuple[UnitSpan, ...]  # the units holding its documents, in order
    gathers: tuple[GatherTask, ...] = ()  # when it spans many units: read from these instead


def plan_shards(facts: list[UnitFacts], spec: Spec, max_docs: int | None) -> tuple[dict[str, SplitInfo], list[ShardTask]]:
    """Prefix sums over the units, in unit order: each split's counts for the manifest (shards still empty) and
    one task per shard. `facts` must be the units 0..k in order; documents from `max_docs` on are left out."""
    counts = np.array([f.documents for f in facts], dtype=np.int64)
    first = np.cumsum(counts) - counts  # global index of each unit's first document
    if max_docs is not None:
        counts = np.clip(max_docs - first, 0, counts)
    idx = np.arange(int(counts.sum()))  # contiguous: max_docs only cuts the tail
    unit_of = np.repeat(np.arange(len(facts)), counts)
    lengths = np.concatenate([f.lengths[:n] for f, n in zip(facts, counts)] or [np.empty(0, np.int64)])
    if spec.kind == "text":
        codes, ok = split_codes(idx, spec.seed, spec.val_frac), np.ones(len(idx), bool)
    else:
        codes = np.concatenate([f.split[:n] for f, n in zip(facts, counts)] or [np.empty(0, np.int8)])
        ok = np.concatenate([f.ok[:n] for f, n in zip(facts, counts)] or [np.empty(0, bool)])
    window = spec.window
    per_shard = samples_per_shard(spec.fmt, window, spec.dtype, len(spec.columns), spec.shard_size)
    splits: dict[str, SplitInfo] = {}
    tasks: list[ShardTask] = []
    for code, split in enumerate(SPLITS):
        mine = codes == code
        doc, length, unit, fits = idx[mine], lengths[mine], unit_of[mine], ok[mine]
        tokens = int(length.sum())
        packed = spec.kind == "text" and spec.pack
        if packed:
            ends = np.cumsum(length)  # the token position after each document in the split's stream
            windows = tokens // window
            dropped = tokens - windows * window

            def span(w0: int, n: int) -> tuple[int, int, int]:
                """Windows [w0, w0 + n): the documents holding their first and last tokens, and how far into
                the first one the first window starts."""
                p0 = int(np.searchsorted(ends, w0 * window, side="right"))
                p1 = int(np.searchsorted(ends, (w0 + n) * window - 1, side="right"))
                return p0, w0 * window - int(ends[p0] - length[p0]), p1
        else:
            holders = np.flatnonzero(fits)  # the documents that become windows, one each
            windows = len(holders)
            dropped = int(np.maximum(length - window, 0).sum()) if spec.kind == "text" else int(length[~fits].sum())

            def span(w0: int, n: int) -> tuple[int, int, int]:
                return int(holders[w0]), 0, int(holders[w0 + n - 1])
        splits[split] = SplitInfo(documents=len(doc), tokens=tokens, windows=windows, tokens_dropped=dropped,
                                  too_long=len(doc) - windows if spec.kind == "pair" else 0)
        for j, w0 in enumerate(range(0, windows, per_shard)):
            n = min(per_shard, windows - w0)
            p0, offset, p1 = span(w0, n)
            state = (int(doc[p0]), offset, 0, w0 * window if packed else 0)
            used = tuple((int(u), int(first[u]), int(counts[u])) for u in np.unique(unit[p0 : p1 + 1]))
            gathers = () if len(used) <= GATHER_UNITS else tuple(
                GatherTask(split, j, k, state[0], used[i : i + GATHER_UNITS])
                for k, i in enumerate(range(0, len(used), GATHER_UNITS))
            )
            tasks.append(ShardTask(split, j, w0, n, state, used, gathers))
    return splits, tasks


# ---------------------------------------------------------------- phase 2


def marker_path(spec: Spec, split: str, index: int) -> str:
    return spec.work(SHARDS_DIR, f"{split}-{index:05d}.json")


def finished_shard(spec: Spec, task: ShardTask) -> ShardInfo | None:
    """The shard's record from an earlier run, if the shard is there with that size and sha256."""
    fs, root = spec.open()
    marker = read_if_there(fs, marker_path(spec, task.split, task.index))
    if marker is None:
        return None
    info = ShardInfo(**json.loads(marker))
    try:
        check_shard_bytes(info, storage.read_bytes(fs, storage.join(root, info.path)), info.path)
    except (FileNotFoundError, VerifyError):
        return None
    return info


Piece = tuple[np.ndarray, "enc.TextTokens | enc.PairWindows", np.ndarray]  # doc indexes, their tokens, labels


def _take(kind: str, result, sel: np.ndarray):
    """The documents `sel` (sorted positions) of an encoded run. A val shard keeps about 1 % of each unit: an index
    per kept token then costs far less than a mask over every token, which is cheaper when most are kept."""
    if kind == "text" and 2 * len(sel) > len(result.lengths):
        keep = np.zeros(len(result.lengths), bool)
        keep[sel] = True
        return select_text(result, keep)
    if kind == "text":
        starts = (np.cumsum(result.lengths) - result.lengths)[sel]
        lengths = result.lengths[sel]
        positions = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        return enc.TextTokens(result.flat[positions], lengths)
    return enc.PairWindows(result.windows[sel], result.ok[sel], result.lengths[sel])


def unit_piece(spec: Spec, fs, span: UnitSpan, code: int, start_doc: int) -> Piece:
    """A unit's documents of one split, from `start_doc` on (and before --max_docs)."""
    unit, first_doc, n_docs = span
    a = load_arrays(storage.read_bytes(fs, unit_paths(spec, unit)[0]))
    idx = first_doc + np.arange(len(a["lengths"]), dtype=np.int64)
    if spec.kind == "text":
        codes, result = split_codes(idx, spec.seed, spec.val_frac), enc.TextTokens(a["tokens"], a["lengths"])
    else:
        codes, result = a["split"], enc.PairWindows(a["windows"], a["ok"], a["lengths"])
    sel = np.flatnonzero((codes == code) & (idx >= start_doc) & (idx < first_doc + n_docs))
    labels = a["labels"][sel] if "labels" in a else np.full(len(sel), -1, np.int64)
    return idx[sel], _take(spec.kind, result, sel), labels


def _piece_arrays(piece: Piece) -> dict[str, np.ndarray]:
    idx, result, labels = piece
    if isinstance(result, enc.TextTokens):
        return {"doc": idx, "lengths": result.lengths, "tokens": result.flat}
    return {"doc": idx, "lengths": result.lengths, "ok": result.ok, "windows": result.windows, "labels": labels}


def _piece(a: dict[str, np.ndarray]) -> Piece:
    if "tokens" in a:
        return a["doc"], enc.TextTokens(a["tokens"], a["lengths"]), np.full(len(a["doc"]), -1, np.int64)
    return a["doc"], enc.PairWindows(a["windows"], a["ok"], a["lengths"]), a["labels"]


def gather_path(spec: Spec, g: GatherTask) -> str:
    return spec.work(GATHER_DIR, f"{g.split}-{g.shard:05d}-{g.part:03d}.data")


def gather(spec: Spec, g: GatherTask) -> bool:
    """Phase 2, before a shard that spans many units: its split's documents from a group of them, in one file.
    Returns whether an earlier run had written it."""
    fs, _ = spec.open()
    path = gather_path(spec, g)
    if storage.exists(fs, path):
        return True
    pieces = [unit_piece(spec, fs, span, SPLITS.index(g.split), g.start_doc) for span in g.units]
    arrays = [_piece_arrays(p) for p in pieces]
    storage.write_atomic(fs, path, dump_arrays({k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}))
    return False


def write_shard(spec: Spec, task: ShardTask) -> tuple[ShardInfo, bool]:
    """Phase 2: write one shard (or find it done); returns its record and whether it was already there."""
    done = finished_shard(spec, task)
    if done is not None:
        return done, True
    fs, root = spec.open()
    committed: list[ShardInfo] = []
    writer = ShardWriter(fs, root, task.split, spec.fmt, spec.window, spec.dtype, list(spec.columns), spec.shard_size,
                         on_commit=lambda info, _state: committed.append(info), first_shard=task.index,
                         first_sample=task.first_sample)
    assembler = make_assembler(spec.kind, spec.pack, spec.cmp_len, spec.seq_len, spec.pad_id, list(task.state))
    code, need = SPLITS.index(task.split), task.samples
    if task.gathers:
        pieces = (_piece(load_arrays(storage.read_bytes(fs, gather_path(spec, g)))) for g in task.gathers)
    else:
        pieces = (unit_piece(spec, fs, span, code, task.state[0]) for span in task.units)
    for idx, result, labels in pieces:
        windows, extras, states, _ = assemble(assembler, spec.kind, idx, result, labels, None, list(spec.columns))
        take = min(need, len(windows))
        writer.add(windows[:take], {c: v[:take] for c, v in extras.items()}, states[:take])
        need -= take
        if need == 0:
            break
    writer.close()
    if need or len(committed) != 1:
        raise RuntimeError(f"shard {task.split}/{task.index}: {task.samples - need} of {task.samples} windows "
                           f"from units {[u for u, _, _ in task.units]} (was _work changed by hand?)")
    storage.write_atomic(fs, marker_path(spec, task.split, task.index), json.dumps(asdict(committed[0])).encode())
    return committed[0], False
