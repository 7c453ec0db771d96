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


WORDS = (
    "the of and to a in is that it was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them then she many "
    "some so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where most "
    "know get through back much before go good new write our used me man too any day same right look think also "
    "around another came come work three word must because does part even place well such here take why things help "
    "put years different away again off went old number great tell men say small every found still between name "
    "should home big give air line set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took sometimes four "
    "head above kind began almost live page got earth need far hand high year mother light parts country father let "
    "night following picture being study second eyes soon times story boys since white days ever paper hard near"
).split()


def english_like_docs(n_docs: int, seed: int = 0, mean_words: int = 200) -> list[str]:
    """Deterministic English-like documents: Zipf-distributed common words in sentences and paragraphs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    docs = []
    for _ in range(n_docs):
        n = max(8, int(rng.exponential(mean_words)))
        picks = words[rng.choice(len(words), size=n, p=p)]
        out, i = [], 0
        while i < n:
            k = int(rng.integers(5, 20))
            sentence = " ".join(picks[i : i + k])
            out.append(sentence[:1].upper() + sentence[1:] + str(rng.choice([".", ".", ".", "?", "!"])))
            if rng.random() < 0.15:
                out.append("\n\n")
            i += k
        docs.append(" ".join(out).replace(" \n\n ", "\n\n").strip())
    return docs


def write_jsonl(path: str, docs: list[str]) -> str:
    import json

    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path
