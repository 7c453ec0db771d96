"""`model_parallel`: one process, the layers of a Hugging Face model spread over the visible GPUs by accelerate.

Placement is a step applied to a built model: every model with a transformers LM exposes it as `lm`, accelerate's
`device_map="auto"` (capped per device by `max_memory`) spreads that LM, and the model's other parameters (a
compressor's vectors and projection) go to the LM's first device. Accelerate's hooks move each layer's inputs to
its device and return the outputs on the device the batch came from, so the loop keeps its batches on the first
device and needs nothing else. It does not combine with DDP (`multi_gpu`): that would need one full replica per
process. Layers the map sends to disk (or CPU RAM, beside GPUs) live on the meta device between calls: fine for
evaluation, but an optimizer cannot update them, so training refuses such a map.
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn

from train.config import Config, ConfigError


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


def load_kwargs(cfg: Config) -> dict[str, Any]:
    """`from_pretrained` arguments that load each layer straight onto its device: a large pretrained model is
    never whole in CPU RAM first."""
    require_accelerate()
    return {"device_map": "auto", "max_memory": max_memory(cfg), "offload_folder": tempfile.mkdtemp(prefix="offload-")}


def dispatch(lm: nn.Module, cfg: Config) -> None:
    """Spread a built transformers model over the devices (in place) as device_map "auto" would load it."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import offload_state_dict

    device_map = infer_auto_device_map(lm, max_memory=max_memory(cfg), no_split_module_classes=lm._no_split_modules)
    offload = None
    on_disk = tuple(name for name, device in device_map.items() if device == "disk")
    if on_disk:  # dispatch_model reads disk-mapped weights from the folder: write them there first
        offload = tempfile.mkdtemp(prefix="offload-")
        offload_state_dict(offload, {k: v for k, v in lm.state_dict().items()
                                     if any(n == "" or k == n or k.startswith(n + ".") for n in on_disk)})
    dispatch_model(lm, device_map=device_map, offload_dir=offload)
    lm.hf_device_map = device_map


def place(model: nn.Module, cfg: Config) -> nn.Module:
    """Spread `model.lm` over the devices (unless it was loaded spread) and move the rest of the model to its
    first device. Load weights before placing: loading a state dict into a placed model would leave its
    offloaded layers untouched."""
    require_accelerate()
    lm = model.lm
    if not hasattr(lm, "hf_device_map"):
        dispatch(lm, cfg)
    first = next(d for d in lm.hf_device_map.values() if d != "disk")
    device = torch.device("cuda", first) if isinstance(first, int) else torch.device(first)
    for child in model.children():
        if child is not lm:
            child.to(device)
    for p in model.parameters(recurse=False):
        p.data = p.data.to(device)
    return model


def check_trainable(model: nn.Module) -> None:
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ConfigError(f"config key 'max_memory': the device map offloads {len(offloaded)} parameters (e.g. "
                          f"{offloaded[0]}) to disk or CPU RAM, which training cannot update; raise max_memory or "
                          f"add GPUs")
