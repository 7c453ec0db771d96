"""Real tokenizers without network, for tests and benchmarks.

GPT-2's byte-level BPE is rebuilt from `whisper/assets/gpt2.tiktoken` inside the openai-whisper source
package (downloaded from PyPI by `make install` into .cache/): its 50,256 ranks give the merges by replaying
BPE on each token's bytes with lower ranks only. Nothing generated is committed.
"""
from __future__ import annotations

import base64
import glob
import os
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHISPER_SDIST = os.path.join(REPO, ".cache", "openai_whisper-20250625.tar.gz")


def _read_ranks() -> dict[bytes, int]:
    paths = glob.glob(WHISPER_SDIST)
    if not paths:
        raise FileNotFoundError(f"{WHISPER_SDIST} missing: run `make install` (it downloads openai-whisper's sdist)")
    with tarfile.open(paths[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        text = tar.extractfile(member).read().decode()
    ranks = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _split_in_two(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(
            ((ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)
             if ranks.get(parts[i] + parts[i + 1], max_rank) < max_rank),
            default=None,
        )
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


def build_gpt2_tokenizer(out_dir: str) -> str:
    """Write a GPT-2 tokenizer (tokenizer.json + config) to `out_dir`; loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    ranks = _read_ranks()
    b2u = bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            a, b = _split_in_two(ranks, tok, rank)
            merges.append((to_str(a), to_str(b)))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(out_dir)
    return out_dir
