"""Turn tokenized documents into fixed `cmp_len + seq_len` windows, one assembler per split.

Every window carries a resume state row: (next_doc, next_offset, dropped, kept) = the source position of the
first token not yet in a window, and the cumulative tokens dropped and kept so far. A run restarted from the
state of its last committed window re-reads the source from there and produces the same windows.
"""
from __future__ import annotations

import numpy as np

from preprocess.encode import PairWindows, TextTokens

STATE_FIELDS = ("next_doc", "next_offset", "dropped", "kept")


def _states(next_doc: np.ndarray, next_offset: np.ndarray, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
    return np.stack([next_doc, next_offset, dropped, kept], axis=1).astype(np.int64)


class Assembler:
    def __init__(self, window: int, state: list[int] | None = None):
        self.window = window
        self.next_doc, self.next_offset, self.dropped, self.kept = state or [0, 0, 0, 0]

    def tail(self) -> int:
        """Tokens left over at the end of the split, dropped."""
        return 0

    def _advance(self, doc_idx: np.ndarray, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """State rows for whole documents, one window each (Truncator, PairAssembler): the next document
        starts at offset 0."""
        states = _states(doc_idx + 1, np.zeros_like(doc_idx), self.dropped + np.cumsum(dropped), self.kept + np.cumsum(kept))
        if len(states):
            self.next_doc, self.next_offset, self.dropped, self.kept = (int(x) for x in states[-1])
        return states


class Packer(Assembler):
    """Concatenate documents (each ends with eos) and cut consecutive windows: nothing but the tail is lost."""

    def __init__(self, window: int, state: list[int] | None = None):
        super().__init__(window, state)
        self.resume_doc, self.resume_offset = self.next_doc, self.next_offset
        self.buf = np.empty(0, dtype=np.int64)
        # pieces of documents in the buffer: where each starts, its document, and its offset in that document
        self.p_start = np.empty(0, dtype=np.int64)
        self.p_doc = np.empty(0, dtype=np.int64)
        self.p_off = np.empty(0, dtype=np.int64)

    def add(self, doc_idx: np.ndarray, tokens: TextTokens) -> tuple[np.ndarray, np.ndarray]:
        flat, lengths = tokens.flat, tokens.lengths
        offsets = np.where(doc_idx == self.resume_doc, self.resume_offset, 0)  # a resumed document restarts mid-way
        if offsets.any():
            within = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            flat = flat[within >= np.repeat(offsets, lengths)]
            lengths = lengths - offsets
        starts = len(self.buf) + np.cumsum(lengths) - lengths
        self.buf = np.concatenate([self.buf, flat]) if len(self.buf) else flat
        self.p_start = np.concatenate([self.p_start, starts])
        self.p_doc = np.concatenate([self.p_doc, doc_idx])
        self.p_off = np.concatenate([self.p_off, offsets])

        n = len(self.buf) // self.window
        if n == 0:
            return self.buf[:0].reshape(0, self.window), np.empty((0, len(STATE_FIELDS)), np.int64)
        used = n * self.window
        windows = self.buf[:used].reshape(n, self.window)
        ends = np.arange(1, n + 1) * self.window
        piece = np.searchsorted(self.p_start, ends, side="right") - 1
        states = _states(
            self.p_doc[piece], self.p_off[piece] + ends - self.p_start[piece], np.full(n, self.dropped), self.kept + ends
        )
        self.kept += used
        self.next_doc, self.next_offset = int(states[-1, 0]), int(states[-1, 1])
        keep = np.searchsorted(self.p_start, used, side="right") - 1
        self.buf = self.buf[used:]
        self.p_off = self.p_off[keep:] + np.maximum(used - self.p_start[keep:], 0)
        self.p_start = np.maximum(self.p_start[keep:] - used, 0)
        self.p_doc = self.p_doc[keep:]
        return windows, states

    def tail(self) -> int:
        return len(self.buf)


class Truncator(Assembler):
    """`--no_pack`: the original layout, one window per document, cut to length and padded."""

    def __init__(self, cmp_len: int, seq_len: int, pad_id: int, state: list[int] | None = None):
        super().__init__(cmp_len + seq_len, state)
        self.cmp_len, self.pad_id = cmp_len, pad_id

    def add(self, doc_idx: np.ndarray, tokens: TextTokens) -> tuple[np.ndarray, np.ndarray]:
        n = len(doc_idx)
        windows = np.full((n, self.window), self.pad_id, dtype=tokens.flat.dtype)
        starts = np.cumsum(tokens.lengths) - tokens.lengths
        for i, (s, length) in enumerate(zip(starts, tokens.lengths)):
            doc = tokens.flat[s : s + min(length, self.window)]
            if len(doc) < self.cmp_len:  # short documents are left-padded into the compression part
                windows[i, self.cmp_len - len(doc) : self.cmp_len] = doc
            else:
                windows[i, : len(doc)] = doc
        kept = np.minimum(tokens.lengths, self.window)
        return windows, self._advance(doc_idx, tokens.lengths - kept, kept)


class PairAssembler(Assembler):
    """GLUE and arithmetic: the encoder already built padded windows; pairs that do not fit are dropped."""

    def add(self, doc_idx: np.ndarray, pairs: PairWindows) -> tuple[np.ndarray, np.ndarray]:
        kept = np.where(pairs.ok, pairs.lengths, 0)
        states = self._advance(doc_idx, pairs.lengths - kept, kept)
        return pairs.windows[pairs.ok], states[pairs.ok]
