"""`model_parallel`: one process, the layers of a Hugging Face model spread over the visible GPUs by accelerate.

The model is cut by `device_map="auto"` (capped per device by `max_memory`), and accelerate's hooks move each
layer's inputs to its device and return the outputs on the device the batch came from, so the loop keeps its
batches on the first device and needs nothing else. It does not combine with DDP (`multi_gpu`): that would
need one full replica per process. Layers the map sends to disk (or CPU RAM, beside GPUs) live on the meta device
between calls: fine for evaluation, but an optimizer cannot update them, so training refuses such a map.
"""
from __future__ import annotations

import tempfile

import torch
from torch import nn

from train.config import Config, ConfigError
from train.hf_model import load_causal_lm


def max_memory(cfg: Config) -> dict | None:
    """JSON keys are strings; accelerate names GPUs by integer index ("0" -> 0)."""
    if cfg.max_memory is None:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in cfg.max_memory.items()}


def require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("config key 'model_parallel': needs the accelerate package (pip install accelerate)") from None


def load_sharded(cfg: Config, vocab_size: int, window: int) -> nn.Module:
    require_accelerate()
    mm = max_memory(cfg)
    if cfg.pretrained:  # loads each layer straight onto its device: never the whole model in CPU RAM first
        return load_causal_lm(cfg, vocab_size, window, device_map="auto", max_memory=mm)
    return dispatch(load_causal_lm(cfg, vocab_size, window), cfg)


def dispatch(model: nn.Module, cfg: Config) -> nn.Module:
    """Spread a built transformers model over the devices as device_map "auto" would load it."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import offload_state_dict

    device_map = infer_auto_device_map(model, max_memory=max_memory(cfg),
                                       no_split_module_classes=model._no_split_modules)
    offload = None
    on_disk = tuple(name for name, device in device_map.items() if device == "disk")
    if on_disk:  # dispatch_model reads disk-mapped weights from the folder: write them there first
        offload = tempfile.mkdtemp(prefix="offload-")
        offload_state_dict(offload, {k: v for k, v in model.state_dict().items()
                                     if any(n == "" or k == n or k.startswith(n + ".") for n in on_disk)})
    model = dispatch_model(model, device_map=device_map, offload_dir=offload)
    model.hf_device_map = device_map
    return model


def shard_loaded(model: nn.Module, cfg: Config) -> nn.Module:
    """Spread one of our hf/compressor models, built on the CPU and loaded from a checkpoint, over the devices.

    Loading a state dict into an already-dispatched model would leave its offloaded layers untouched, which is
    why evaluation loads first and shards after."""
    from train.compressor import Compressor

    require_accelerate()
    if not isinstance(model, Compressor):
        model.model = dispatch(model.model, cfg)
        return model
    model.base = dispatch(model.base, cfg)
    first = next(d for d in model.base.hf_device_map.values() if d != "disk")
    device = torch.device("cuda", first) if isinstance(first, int) else torch.device(first)
    model.embs.data = model.embs.data.to(device)
    if model.proj is not None:
        model.proj.to(device)
    return model


def check_trainable(model: nn.Module) -> None:
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ConfigError(f"config key 'max_memory': the device map offloads {len(offloaded)} parameters (e.g. "
                          f"{offloaded[0]}) to disk or CPU RAM, which training cannot update; raise max_memory or "
                          f"add GPUs")
