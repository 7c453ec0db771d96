"""Tokenizers: loading a Hugging Face one (Hub name or local folder), the built-in character tokenizer for
arithmetic, and the facts the manifest records about them (hash, special ids, segment separators)."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from shards.storage import first_line

CHAR_TOKENIZER = "char"
# The built-in arithmetic alphabet; the specials come first so pad is 0 and eos is 1.
CHAR_SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHAR_ALPHABET = list("0123456789+-*=() ")
SENTENCE_ENDS = (".", "!", "?")


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded or used; the message names it and suggests a fix."""


def build_char_tokenizer():
    """A real fast HF tokenizer with one token per character, saved as tokenizer.json like any other."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS + CHAR_ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def load_tokenizer(name: str):
    """`char`, a Hub id or a local folder. Only fast tokenizers: workers use their tokenizer.json directly."""
    if name == CHAR_TOKENIZER:
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # offline Hub, missing folder, unreadable files: all end the same way
        hint = "a local folder" if not os.path.isdir(name) else "a folder with tokenizer.json or vocab/merges"
        raise TokenizerError(
            f"cannot load tokenizer {name!r} ({first_line(e, 200)}); pass --tokenizer {hint}"
        ) from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise TokenizerError(f"tokenizer {name!r} has no fast (tokenizer.json) version; convert it first")
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer {name!r} has no eos token; documents need one between them")
    return tok


def save_tokenizer(tok, out_dir: str) -> str:
    """Save to `out_dir` and return a sha256 over its files, the identity recorded in the manifest."""
    tok.save_pretrained(out_dir)
    h = hashlib.sha256()
    for name in sorted(os.listdir(out_dir)):
        h.update(name.encode() + b"\0")
        with open(os.path.join(out_dir, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def pad_id(tok) -> int:
    """GPT-2-style tokenizers have no pad token: pad with eos, as the original did (the manifest says so)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def separator_ids(tok, dataset: str) -> list[int]:
    """Token ids that end a semantic segment: `=` for arithmetic; for text, tokens whose text ends a
    sentence (., !, ?) or a line. The heuristic is recorded in the manifest and overridable in training."""
    if dataset == "arithmetic":
        return [tok.convert_tokens_to_ids("=")]
    backend = tok.backend_tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)
    texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=True)
    seps = [i for i, t in enumerate(texts) if t.rstrip(" ").endswith(SENTENCE_ENDS) or t.endswith("\n")]
    return [int(i) for i in np.asarray(seps)]
