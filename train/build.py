"""Model construction: the config picks the family, the family builds itself, placement comes last.

Imports flow one way: this module imports the families (`transformer`, `hf_model`, `compressor`) and the
placement (`parallel`); none of them imports this module. Every model maps (input_ids, position_ids, mask) to
logits, reads a blotched batch through its `view` (identity except for the compressor) and has `decode` for
cached generation. The vocabulary is the dataset's plus the blotch-intensity tokens.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train import compressor, hf_model, parallel, transformer
from train.config import Config, ConfigError


def vocab_size(cfg: Config, dataset_vocab: int) -> int:
    """The dataset's tokens, then one token per blotch-intensity level."""
    return dataset_vocab + (cfg.n_btokens if cfg.blotch_tokens else 0)


def row_length(cfg: Config, window: int) -> int:
    """The longest row a model reads: the window, led by a level token with blotch_tokens, or for a compressor
    followed by its vectors and a task token."""
    if cfg.model_type == "compressor":
        return window + compressor.extra_tokens(cfg)
    return window + (1 if cfg.blotch_tokens else 0)


def check(cfg: Config, dataset_vocab: int, window: int) -> None:
    """What building would refuse, found without building (a run checks it before its folder exists): a row
    longer than the model's positions."""
    n = row_length(cfg, window)
    if cfg.model_type == "transformer":
        if cfg.max_posencs is not None and cfg.max_posencs < n:
            raise ConfigError(f"config key 'max_posencs': {cfg.max_posencs} rows, fewer than the {n} tokens of a row")
        return
    if cfg.model_type == "compressor":
        compressor.check(cfg)
    hf_model.check_positions(cfg, hf_model.hf_config(cfg, vocab_size(cfg, dataset_vocab)), n)


def _build(cfg: Config, dataset_vocab: int, window: int, weights: bool, load: dict[str, Any]) -> nn.Module:
    """`weights`: load a pretrained LM's weights (with `load`, parallel.load_kwargs); false when a checkpoint's
    will replace them."""
    vocab, n = vocab_size(cfg, dataset_vocab), row_length(cfg, window)
    if cfg.model_type == "transformer":
        return transformer.build(cfg, vocab, window, n)
    if cfg.model_type == "compressor":
        compressor.check(cfg)
        return compressor.Compressor(cfg, hf_model.load_causal_lm(cfg, vocab, n, weights, **load))
    return hf_model.HFCausalLM(hf_model.load_causal_lm(cfg, vocab, n, weights, **load))


def build_model(cfg: Config, dataset_vocab: int, window: int) -> nn.Module:
    """A model to train: with model_parallel spread over the GPUs (every weight on one, so trainable)."""
    if not cfg.model_parallel:
        return _build(cfg, dataset_vocab, window, True, {})
    load = parallel.load_kwargs(cfg) if cfg.pretrained else {}
    model = parallel.place(_build(cfg, dataset_vocab, window, True, load), cfg)
    parallel.check_trainable(model)
    return model


def load_model(cfg: Config, dataset_vocab: int, window: int, weights: dict[str, torch.Tensor],
               device: torch.device) -> nn.Module:
    """A trained model to evaluate: built on the CPU, its weights loaded, then moved to `device` or, with
    model_parallel, spread over the GPUs (a map may offload layers: evaluation does not update them)."""
    model = _build(cfg, dataset_vocab, window, False, {})
    model.load_state_dict(weights)
    return parallel.place(model, cfg) if cfg.model_parallel else model.to(device)
