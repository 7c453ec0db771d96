"""Hugging Face causal LMs behind the trainer's interface: (input_ids, position_ids, mask) -> logits.

Blotching excises tokens, so the positions come in explicitly: the HF model gets them as `position_ids` and the
kept-token mask as its `attention_mask`, and attends with its own implementation (SDPA by default, flash
attention where the model and hardware offer it). The vocabulary is the dataset's, not the checkpoint's: the
shards hold the dataset tokenizer's ids, so a model with another embedding size is resized (with a warning).
`transformers` is imported when a model is built, not with the package: a from-scratch run never pays for it.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
from torch import nn

from shards.storage import first_line
from train.blotch import Blotched
from train.config import Config, ConfigError


def _source(name: str) -> tuple[str, dict[str, Any]]:
    """(path or id, extra from_pretrained kwargs): a `.gguf` file is loaded from its folder with `gguf_file`."""
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ConfigError(f"config key 'hf_model': {name} not found")
        return os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    return name, {}


def hf_config(cfg: Config, vocab_size: int | None):
    """hf_model's config (or a model type's defaults) with hf_config applied and the run's vocabulary
    (None: keep the checkpoint's, which loading then resizes)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    name, overrides = cfg.hf_model, dict(cfg.hf_config or {})
    if "vocab_size" in overrides:
        raise ConfigError("config key 'hf_config': vocab_size comes from the dataset (and blotch tokens); omit it")
    # a model type's defaults only when no weights are asked for: pretrained "gpt2" is the Hub's gpt2
    bare = not cfg.pretrained and not os.path.exists(name) and not name.endswith(".gguf") and name in CONFIG_MAPPING
    path, extra = (name, {}) if bare else _source(name)
    try:
        base = AutoConfig.for_model(name) if bare else AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError) as e:  # offline Hub, missing folder, unknown model type
        raise ConfigError(f"config key 'hf_model': cannot load {name!r} ({first_line(e)}); offline, pass a local "
                          f"folder or a .gguf file, or pretrained false with a model type (gpt2, llama)") from None
    for key in overrides:
        if not hasattr(base, key):
            raise ConfigError(f"config key 'hf_config': {type(base).__name__} has no attribute {key!r}")
    if bare:  # a model type's defaults, no download; built with the overrides so that derived attributes
        # (Llama's head_dim from hidden_size) follow them
        config = AutoConfig.for_model(name, **overrides)
    else:  # a real config: overrides replace its values as they are (set derived ones explicitly)
        config = AutoConfig.from_pretrained(path, **extra, **overrides)
    if vocab_size is not None:
        config.vocab_size = vocab_size
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of another tokenizer mean nothing here
            value = getattr(config, key, None)
            if isinstance(value, int) and value >= vocab_size:
                setattr(config, key, None)
    config.quantization_config = None  # a GGUF checkpoint's; the model is trained in full precision
    return config


def n_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def load_causal_lm(cfg: Config, vocab_size: int, max_len: int, weights: bool = True, **load: Any) -> nn.Module:
    """The transformers model on the dataset's vocabulary: pretrained weights (when `pretrained` and `weights`;
    a checkpoint's are loaded later otherwise) or a fresh init from its config.

    `max_len` is the longest row the model will read; `load` goes to `from_pretrained` (parallel.load_kwargs:
    a device map that puts each layer straight onto its device)."""
    from transformers import AutoModelForCausalLM

    if cfg.pretrained and weights:
        path, extra = _source(cfg.hf_model)
        model = AutoModelForCausalLM.from_pretrained(path, config=hf_config(cfg, None), dtype=torch.float32,
                                                     **extra, **load)
        rows = model.get_input_embeddings().num_embeddings
        if rows != vocab_size:
            warnings.warn(f"hf_model {cfg.hf_model}: {rows} embedding rows resized to the run's vocabulary of "
                          f"{vocab_size} (the dataset's, then any blotch tokens); the tokenizers must agree on the "
                          f"shared ids", stacklevel=2)
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
    else:
        model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size), dtype=torch.float32)
    check_positions(cfg, model.config, max_len)
    return model


def check_positions(cfg: Config, config: Any, max_len: int) -> None:
    limit = n_positions(config)
    if limit is not None and max_len > limit:
        raise ConfigError(f"config key 'hf_config': {cfg.hf_model} has {limit} positions, fewer than the "
                          f"{max_len} tokens of a row" + (" (the window and a blotch-level token)"
                                                           if cfg.blotch_tokens else ""))


def cache_kwarg(model: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` within 5.x; use what this model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFCausalLM(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._cache_kw = cache_kwarg(model)

    @property
    def lm(self) -> nn.Module:
        """The transformers model: what model_parallel spreads over the devices."""
        return self.model

    def view(self, v: Blotched) -> Blotched:
        """The blotched batch as this model reads it: as it is."""
        return v

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T) ids, positions and key mask (True = a real token) -> (B, T, vocab) logits.

        The mask always goes in: without one, transformers reads every jump in the positions (an excised step
        with pad_pos_skip false, a level token before the window's columns) as the start of another packed
        sequence and hides everything before it, which decoding (always masked) would not."""
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          attention_mask=None if mask is None else mask.long()).logits

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: Any = None
               ) -> tuple[torch.Tensor, Any]:
        """Incremental decoding: logits of the new tokens given the cache; `mask` covers past and new keys."""
        from transformers import DynamicCache

        cache = DynamicCache() if cache is None else cache
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask.long(), use_cache=True,
                         **{self._cache_kw: cache})
        return out.logits, cache
