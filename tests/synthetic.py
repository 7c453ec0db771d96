"""Arithmetic-like windows in the padded layout, for tests and benchmarks of the trainer.

Like the original's data: `<pad>..<pad>802+203+5=` in the compression part, then one summing step per segment,
`1005+5=1010<eos>`, right-padded. A character vocabulary: pad 0, "=" 2 (the separator), eos 3, "+" 5, digits 8-17.
"""
from __future__ import annotations

import functools
import tempfile

import numpy as np

PAD, SEP, EOS, PLUS = 0, 2, 3, 5
VOCAB = 18
CHARS = {"=": SEP, "+": PLUS, **{str(d): 8 + d for d in range(10)}}


def encode(text: str) -> list[int]:
    return [CHARS[c] for c in text]


def arithmetic_rows(n: int, cmp_len: int, seq_len: int, seed: int = 0, max_terms: int = 4, max_num: int = 1000
                    ) -> np.ndarray:
    """(n, cmp_len + seq_len) uint16 windows; a problem or solution that does not fit is cut short."""
    rng = np.random.default_rng(seed)
    out = np.full((n, cmp_len + seq_len), PAD, dtype=np.uint16)
    for i in range(n):
        terms = [int(x) for x in rng.integers(0, max_num, rng.integers(2, max_terms + 1))]
        problem = encode("+".join(map(str, terms)) + "=")[-cmp_len:] if cmp_len else []
        steps = []
        while len(terms) > 1:
            terms = [terms[0] + terms[1]] + terms[2:]
            steps.append("+".join(map(str, terms)) + ("=" if len(terms) > 1 else ""))
        body = (encode("".join(steps)) + [EOS])[:seq_len]
        out[i, cmp_len - len(problem): cmp_len] = problem
        out[i, cmp_len: cmp_len + len(body)] = body
    return out


@functools.lru_cache(maxsize=1)
def save_tokenizer() -> str:
    """A character tokenizer for this vocabulary, saved once per process; returns its folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [f"<unused{i}>" for i in range(VOCAB)]
    for text, i in {"<pad>": PAD, "<eos>": EOS, **CHARS}.items():
        names[i] = text
    vocab = {text: i for i, text in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unused1>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = tempfile.mkdtemp(prefix="arith-tokenizer-")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(out)
    return out
