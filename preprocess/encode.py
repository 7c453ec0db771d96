"""Tokenization, the part that runs in the `n_data_procs` worker processes.

Workers load the saved tokenizer.json with the `tokenizers` library (not transformers: faster to start and to
call) and return whole numpy arrays per chunk of documents, so the hand-off costs one pickle per chunk.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass
class Chunk:
    """A run of consecutive source documents of one kind (text or pair)."""

    doc_idx: np.ndarray  # int64 position of each document in the source
    split: np.ndarray  # int8 split code per document
    texts: list[str]
    seconds: list[str]
    labels: np.ndarray  # int64, -1 where the source has none


@dataclass
class TextTokens:
    flat: np.ndarray  # all documents' tokens, each followed by eos
    lengths: np.ndarray  # int64 tokens per document (eos included)


@dataclass
class PairWindows:
    windows: np.ndarray  # (n, cmp_len + seq_len): first part left-padded, second (+eos) right-padded
    ok: np.ndarray  # bool: both parts fit; rows that do not are dropped and counted, never cut
    lengths: np.ndarray  # int64 real tokens per pair


class Encoder:
    def __init__(self, tokenizer_json: str, eos_id: int, pad_id: int, cmp_len: int, seq_len: int, dtype: str):
        self.tokenizer_json, self.eos_id, self.pad_id = tokenizer_json, eos_id, pad_id
        self.cmp_len, self.seq_len, self.dtype = cmp_len, seq_len, np.dtype(dtype)
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:  # built lazily so the Encoder pickles cheaply into worker processes
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.tokenizer_json)
        return self._tok

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def text(self, chunk: Chunk) -> TextTokens:
        ids = self._ids(chunk.texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        flat = np.insert(flat, np.cumsum(lengths), self.eos_id)  # eos after every document
        return TextTokens(flat=flat, lengths=lengths + 1)

    def pairs(self, chunk: Chunk) -> PairWindows:
        firsts, seconds = self._ids(chunk.texts), self._ids(chunk.seconds)
        n, window = len(firsts), self.cmp_len + self.seq_len
        out = np.full((n, window), self.pad_id, dtype=self.dtype)
        ok = np.zeros(n, dtype=bool)
        lengths = np.zeros(n, dtype=np.int64)
        for i, (a, b) in enumerate(zip(firsts, seconds)):
            b = b + [self.eos_id]
            lengths[i] = len(a) + len(b)
            if len(a) <= self.cmp_len and len(b) <= self.seq_len:
                ok[i] = True
                out[i, self.cmp_len - len(a) : self.cmp_len] = a
                out[i, self.cmp_len : self.cmp_len + len(b)] = b
        return PairWindows(windows=out, ok=ok, lengths=lengths)

    def encode(self, kind: str, chunk: Chunk) -> TextTokens | PairWindows:
        return self.text(chunk) if kind == "text" else self.pairs(chunk)


_worker_encoder: Encoder | None = None


def init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def encode_in_worker(kind: str, chunk: Chunk) -> TextTokens | PairWindows:
    return _worker_encoder.encode(kind, chunk)
