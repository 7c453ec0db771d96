"""Source -> tokenize (n_data_procs workers) -> windows -> shards -> manifest, resumable at any shard.

Determinism: documents are cut into fixed chunks in source order, workers only tokenize, and the main
process consumes results in chunk order, so the output is the same bytes whatever `n_data_procs` is.
Resumption: after every committed shard, `_progress.json` records the shards so far and each split's source
position (see windows.py). A rerun skips the documents already in shards without tokenizing them.
Memory is bounded: the source is streamed and at most a few chunks per worker are in flight.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from preprocess import encode as enc
from preprocess.sources import Doc, Source
from shards.storage import first_line
from preprocess.tokenizer import pad_id, save_tokenizer, separator_ids
from preprocess.windows import Assembler, Packer, PairAssembler, Truncator
from shards import ShardInfo, ShardWriter, SplitInfo, storage
from shards.manifest import MANIFEST_NAME, Manifest, load_manifest, save_manifest, token_dtype
from shards.summary import TOKENIZER_DIR

SPLITS = ("train", "val")
PROGRESS_NAME = "_progress.json"
WORK_DIR = "_work"  # --executor ray: its intermediate files, removed once the manifest is written
CHUNK_DOCS = {"text": 256, "pair": 1024}
UNIT_SIZE = 8 << 20  # --executor ray: input bytes per work unit (units.py)
T = TypeVar("T")


class ParamsMismatch(ValueError):
    """An existing output was made with other parameters."""


@dataclass
class Job:
    """Everything a run needs, resolved: what to read, how to cut it, where to write."""

    dataset: str
    name: str
    data_root: str
    storage_options: dict | None
    source: Source
    tokenizer: Any
    tokenizer_name: str
    cmp_len: int
    seq_len: int
    fmt: str
    shard_size: int
    n_data_procs: int
    seed: int
    val_frac: float
    max_docs: int | None
    pack: bool
    overwrite: bool
    extra_params: dict[str, Any]
    executor: str = "local"  # or "ray" (preprocess/ray_executor.py): the same bytes either way
    address: str | None = None  # ray: a running cluster's address; None starts a local Ray instance
    unit_size: int = UNIT_SIZE  # ray: input bytes per work unit; the output does not depend on it


def package_version() -> str:
    try:
        return metadata.version("semantic-blotching")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def split_codes(doc_idx: np.ndarray, seed: int, val_frac: float) -> np.ndarray:
    """Per-document train(0)/val(1) from a hash of (seed, document index): stable under streaming and resume."""
    x = doc_idx.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # splitmix64: wrap-around arithmetic is the point
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_frac).astype(np.int8)


def params_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += params_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def pair_splits(docs: list[Doc]) -> np.ndarray:
    """Split codes of documents that carry their own split (pair sources)."""
    return np.array([SPLITS.index(d.split) for d in docs], dtype=np.int8)


def doc_chunk(docs: list[Doc], first: int, split: np.ndarray) -> enc.Chunk:
    """Consecutive documents, the first at source position `first`, as the Chunk the encoder takes."""
    return enc.Chunk(
        doc_idx=np.arange(first, first + len(docs), dtype=np.int64), split=split, texts=[d.text for d in docs],
        seconds=[d.second for d in docs], labels=np.array([-1 if d.label is None else d.label for d in docs], dtype=np.int64),
    )


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items, the last one shorter (itertools.batched from Python 3.12)."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def chunks(job: Job) -> Iterator[enc.Chunk]:
    start = 0
    for docs in batched(itertools.islice(job.source, job.max_docs), CHUNK_DOCS[job.source.kind]):
        idx = np.arange(start, start + len(docs), dtype=np.int64)
        codes = split_codes(idx, job.seed, job.val_frac) if job.source.kind == "text" else pair_splits(docs)
        yield doc_chunk(docs, start, codes)
        start += len(docs)


def select(chunk: enc.Chunk, keep: np.ndarray) -> enc.Chunk:
    return enc.Chunk(
        doc_idx=chunk.doc_idx[keep], split=chunk.split[keep],
        texts=[t for t, k in zip(chunk.texts, keep) if k], seconds=[t for t, k in zip(chunk.seconds, keep) if k],
        labels=chunk.labels[keep],
    )


def select_text(tokens: enc.TextTokens, keep: np.ndarray) -> enc.TextTokens:
    return enc.TextTokens(flat=tokens.flat[np.repeat(keep, tokens.lengths)], lengths=tokens.lengths[keep])


def assemble(assembler: Assembler, kind: str, doc_idx: np.ndarray, result: enc.TextTokens | enc.PairWindows,
             labels: np.ndarray, keep: np.ndarray | None, columns: list[str]
             ) -> tuple[np.ndarray, dict, np.ndarray, int]:
    """Window the documents of an encoded chunk that `keep` selects (one split's; None: all of them, without a
    copy): the windows, their extra columns and resume states, and how many tokens those documents held."""
    if keep is not None:
        doc_idx = doc_idx[keep]
        if kind == "text":
            result = select_text(result, keep)
        else:
            result, labels = enc.PairWindows(result.windows[keep], result.ok[keep], result.lengths[keep]), labels[keep]
    windows, states = assembler.add(doc_idx, result)
    extras = {c: labels[result.ok] for c in columns} if kind != "text" else {}
    return windows, extras, states, int(result.lengths.sum())


def make_assembler(kind: str, pack: bool, cmp_len: int, seq_len: int, pad: int, state: list[int] | None) -> Assembler:
    """The window assembler of a source kind, started from a resume state (None: the beginning)."""
    if kind == "pair":
        return PairAssembler(cmp_len + seq_len, state)
    if pack:
        return Packer(cmp_len + seq_len, state)
    return Truncator(cmp_len, seq_len, pad, state)


class Run:
    """One invocation: owns the output folder, the per-split assemblers and writers, and the progress file."""

    def __init__(self, job: Job):
        self.job = job
        self.fs, root = storage.open_fs(job.data_root, job.storage_options)
        self.out = storage.join(root, job.name)
        self.url = storage.display_url(self.fs, self.out)
        self.window = job.cmp_len + job.seq_len

    # ------------------------------------------------------------ setup

    def prepare(self, tok_dir: str) -> dict[str, Any] | None:
        """Save the tokenizer, check any existing output; return the progress to resume from (or None)."""
        job = self.job
        self.tok_sha = save_tokenizer(job.tokenizer, tok_dir)
        self.vocab_size = len(job.tokenizer)
        self.dtype = token_dtype(self.vocab_size)
        self.params = {
            "dataset": job.dataset, "source": job.source.description, "tokenizer": job.tokenizer_name,
            "tokenizer_sha256": self.tok_sha, "cmp_len": job.cmp_len, "seq_len": job.seq_len, "seed": job.seed,
            "max_docs": job.max_docs, "format": job.fmt, "shard_size": job.shard_size, **job.extra_params,
        }
        if job.source.kind == "text":
            self.params.update(val_frac=job.val_frac, pack=job.pack)
        if job.overwrite:
            storage.remove_tree(self.fs, self.out)
        storage.remove_stale_temps(self.fs, self.out)
        manifest_path = storage.join(self.out, MANIFEST_NAME)
        if storage.exists(self.fs, manifest_path):
            self._check_params(load_manifest(self.fs, self.out).params, manifest_path)
            return {"complete": True}
        progress_path = storage.join(self.out, PROGRESS_NAME)
        if storage.exists(self.fs, progress_path):
            progress = json.loads(storage.read_bytes(self.fs, progress_path))
            self._check_params(progress["params"], progress_path)
            return progress
        return None

    def _check_params(self, old: dict, path: str) -> None:
        diff = params_diff(old, self.params)
        if diff:
            raise ParamsMismatch(
                f"{storage.display_url(self.fs, path)} was made with other parameters: {', '.join(diff)}; "
                "use another --name or pass --overwrite"
            )

    # ------------------------------------------------------------ the run

    def execute(self) -> Manifest | None:
        with tempfile.TemporaryDirectory() as tok_dir:
            progress = self.prepare(tok_dir)
            if progress and progress.get("complete"):
                print(f"{self.url} is complete and matches these parameters: nothing to do (--overwrite rebuilds it)")
                return None
            storage.upload_dir(self.fs, tok_dir, storage.join(self.out, TOKENIZER_DIR))
            return self._stream(progress or {}, os.path.join(tok_dir, "tokenizer.json"))

    def _make_assembler(self, state: list[int] | None) -> Assembler:
        job = self.job
        return make_assembler(job.source.kind, job.pack, job.cmp_len, job.seq_len, pad_id(job.tokenizer), state)

    def _stream(self, progress: dict, tokenizer_json: str) -> Manifest:
        job = self.job
        splits = progress.get("splits", {})
        self.shards = {s: [ShardInfo(**x) for x in splits.get(s, {}).get("shards", [])] for s in SPLITS}
        self.states = {s: splits.get(s, {}).get("state") for s in SPLITS}
        assemblers = {s: self._make_assembler(self.states[s]) for s in SPLITS}
        extra_cols = list(job.source.columns)
        writers = {
            s: ShardWriter(
                self.fs, self.out, s, job.fmt, self.window, self.dtype, extra_cols, job.shard_size,
                on_commit=lambda info, state, s=s: self._committed(s, info, state),
                first_shard=len(self.shards[s]), first_sample=sum(x.samples for x in self.shards[s]),
            )
            for s in SPLITS
        }
        documents = dict.fromkeys(SPLITS, 0)
        encoder = enc.Encoder(
            tokenizer_json, job.tokenizer.eos_token_id, pad_id(job.tokenizer), job.cmp_len, job.seq_len, self.dtype
        )
        started = time.perf_counter()
        # `delay`: a run that fails at once (offline Hub, bad file) prints its error line and no bar
        bar = tqdm(total=job.max_docs or job.source.total, unit="doc", desc=job.name, mininterval=1.0, delay=2.0)
        try:
            self._pump(job, assemblers, writers, documents, encoder, bar)
        finally:
            bar.close()
        return self._finish(self._split_infos(assemblers, documents), time.perf_counter() - started)

    def _finish(self, splits: dict[str, SplitInfo], seconds: float) -> Manifest:
        """Write the manifest (last: its presence means complete), then drop what only a resume needed."""
        manifest = self._manifest(splits)
        save_manifest(self.fs, self.out, manifest)
        progress_path = storage.join(self.out, PROGRESS_NAME)
        if storage.exists(self.fs, progress_path):
            self.fs.rm_file(progress_path)
        storage.remove_tree(self.fs, storage.join(self.out, WORK_DIR))
        self._summary(manifest, seconds)
        return manifest

    def _pump(self, job: Job, assemblers: dict, writers: dict, documents: dict, encoder: enc.Encoder, bar) -> None:
        """Read, tokenize and window every document not yet in a committed shard."""
        kind, extra_cols = job.source.kind, list(job.source.columns)
        resume_from = [assemblers[s].next_doc for s in SPLITS]
        started, n_tokens = time.perf_counter(), 0
        self.skipped = 0  # documents already in committed shards: read, not tokenized

        def consume(chunk: enc.Chunk, result) -> None:
            nonlocal n_tokens
            for code, split in enumerate(SPLITS):
                keep = chunk.split == code
                if not keep.any():
                    continue
                windows, extras, states, tokens = assemble(
                    assemblers[split], kind, chunk.doc_idx, result, chunk.labels, keep, extra_cols
                )
                n_tokens += tokens
                writers[split].add(windows, extras, states)
            bar.update(len(chunk.doc_idx))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):,.0f}",
                            shards=sum(len(v) for v in self.shards.values()), refresh=False)

        def to_encode() -> Iterator[enc.Chunk]:
            """Count every document, skip those already in committed shards, yield the rest."""
            for chunk in chunks(job):
                for code, split in enumerate(SPLITS):
                    documents[split] += int((chunk.split == code).sum())
                todo = chunk.doc_idx >= np.asarray(resume_from)[chunk.split]
                self.skipped += int((~todo).sum())
                if todo.all():
                    yield chunk
                elif todo.any():
                    yield select(chunk, todo)
                else:
                    bar.update(len(chunk.doc_idx))

        # Tokenizing happens in worker processes even for n_data_procs=1: the main process's reading, windowing
        # and writing then overlap it, and tokenizers run measurably slower in a process that has imported
        # torch, datasets and transformers. No fork: the parent may hold s3fs threads and rayon pools.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(job.n_data_procs, initializer=enc.init_worker, initargs=(encoder,)) as pool:
            inflight: deque = deque()
            for chunk in to_encode():
                inflight.append((chunk, pool.apply_async(enc.encode_in_worker, (kind, chunk))))
                while len(inflight) > 2 * job.n_data_procs + 2:
                    c, r = inflight.popleft()
                    consume(c, r.get())
            while inflight:
                c, r = inflight.popleft()
                consume(c, r.get())
        for w in writers.values():
            w.close()

    def _committed(self, split: str, info: ShardInfo, state: np.ndarray) -> None:
        self.shards[split].append(info)
        self.states[split] = [int(x) for x in state]
        progress = {
            "params": self.params,
            "splits": {s: {"shards": [asdict(x) for x in self.shards[s]], "state": self.states[s]} for s in SPLITS},
        }
        storage.write_atomic(self.fs, storage.join(self.out, PROGRESS_NAME), json.dumps(progress).encode())

    def _split_infos(self, assemblers: dict[str, Assembler], documents: dict[str, int]) -> dict[str, SplitInfo]:
        splits = {}
        for s in SPLITS:
            a, shards = assemblers[s], self.shards[s]
            windows = sum(x.samples for x in shards)
            splits[s] = SplitInfo(
                shards=shards, documents=documents[s], windows=windows, tokens=a.kept + a.dropped + a.tail(),
                tokens_dropped=a.dropped + a.tail(), too_long=documents[s] - windows if self.job.source.kind == "pair" else 0,
            )
        return splits

    def _manifest(self, splits: dict[str, SplitInfo]) -> Manifest:
        job, tok = self.job, self.job.tokenizer
        return Manifest(
            name=job.name, format=job.fmt, cmp_len=job.cmp_len, seq_len=job.seq_len, dtype=self.dtype,
            vocab_size=self.vocab_size, pad_id=pad_id(tok), eos_id=tok.eos_token_id,
            separator_ids=separator_ids(tok, job.dataset),
            layout="packed" if job.source.kind == "text" and job.pack else "padded",
            columns=dict(job.source.columns),
            tokenizer={"name": job.tokenizer_name, "sha256": self.tok_sha, "path": TOKENIZER_DIR},
            params=self.params, splits=splits, package_version=package_version(), answers=job.source.answers,
        )

    def _summary(self, m: Manifest, seconds: float) -> None:
        docs = sum(s.documents for s in m.splits.values())
        tokens = sum(s.tokens for s in m.splits.values())
        shards = sum(len(s.shards) for s in m.splits.values())
        size = sum(x.bytes for s in m.splits.values() for x in s.shards)
        per_split = ", ".join(f"{k} {v.windows}" for k, v in m.splits.items())
        dropped = sum(s.tokens_dropped for s in m.splits.values())
        too_long = sum(s.too_long for s in m.splits.values())
        print(
            f"{m.name}: {docs} documents, {tokens} tokens, windows {per_split}, {shards} shards, "
            f"{size / 1e6:.1f} MB, {dropped} tokens dropped, {too_long} too long, {seconds:.1f} s "
            f"({tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {self.url}"
            + (f" (resumed: {self.skipped} documents were already in shards)" if self.skipped else "")
        )


def run(job: Job) -> Manifest | None:
    if job.executor == "ray":  # imported only here: `--executor local` never imports ray
        try:
            from preprocess.ray_executor import RayRun
        except ImportError as e:
            if (e.name or "").partition(".")[0] != "ray":
                raise
            raise ValueError(f"--executor ray needs the ray package ({first_line(e)}): pip install "
                             "'semantic-blotching[ray]' (make install installs it)") from None
        return RayRun(job).execute()
    return Run(job).execute()
