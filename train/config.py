"""The training config: every key, its type, default, meaning and valid range, in this one dataclass.

A run is `python -m train cfg.json [--key value ...]`. The JSON file and the overrides are merged and checked
here before anything else runs, so a typo fails in a second with a one-line message instead of after the data
has been opened. `python -m train.config --markdown` prints the README's key table from the same fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import operator
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the value."""


def _f(default: Any, help: str, **bounds: float) -> Any:
    """A config field: `help` is the one-line meaning; bounds are ge/gt/le/lt checks on numbers."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class Config:
    # run and launch
    exp_name: str = _f("run", "experiment name: outputs go to save_root/exp_name/exp_name_<N>/ (N the first free number)")
    save_root: str = _f("runs", "root folder of all experiment outputs")
    data_root: str = _f("data", "root of preprocessed datasets, a local path or any fsspec URL")
    dataset: str = _f("arithmetic", "what preprocess tokenizes (arithmetic, openwebtext, glue, text)")
    name: Optional[str] = _f(None, "dataset folder under data_root, as preprocess writes it; null = dataset")
    storage_options: Optional[dict] = _f(None, "fsspec options for data_root (never written to hyperparams.json)")
    cache_dir: Optional[str] = _f(None, "local shard cache for remote data; null = <system temp>/shards-cache")
    cache_limit: Optional[int] = _f(None, "maximum bytes of the local shard cache", gt=0)
    shuffle_block: int = _f(16, "shards per shuffle block of the train order (0 = one permutation of the whole split); "
                            "the order depends only on seed, epoch, the manifest's shards and this", ge=0)
    multi_gpu: bool = _f(False, "data parallel (DDP) over every visible GPU, or under torchrun over its processes")
    model_parallel: bool = _f(False, "shard an hf/compressor model over the visible GPUs with device_map auto (not with multi_gpu)")
    max_memory: Optional[dict] = _f(None, "model_parallel: memory cap per device, e.g. {\"0\": \"20GiB\", \"cpu\": \"8GiB\"}")
    device: str = _f("auto", "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, mps ...")
    torch_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "compute dtype under autocast; float16 also uses a GradScaler"
    )
    seed: int = _f(0, "seeds every RNG, the data order and the blotching pattern", ge=0)
    init_checkpt: Optional[str] = _f(None, "start from the model weights of this checkpoint file or run folder")
    # loop and optimisation
    n_epochs: int = _f(1, "number of epochs (each followed by validation and a checkpoint)", ge=1)
    n_train_loops: Optional[int] = _f(None, "optimizer steps per epoch; null = one pass over the train split", ge=1)
    max_val_loops: Optional[int] = _f(None, "validation batches (of val_batch_size) per epoch; null = the whole val "
                                      "split", ge=1)
    checkpt_mod: Optional[int] = _f(None, "also checkpoint every this many optimizer steps; null = epoch ends only", ge=1)
    keep_checkpoints: int = _f(3, "keep this many most recent checkpoints", ge=1)
    log_mod: int = _f(10, "write a train line to metrics.jsonl every this many optimizer steps", ge=1)
    tracker: Literal["none", "tensorboard", "wandb"] = _f(
        "none", "also log metrics to tensorboard (event files in the run folder) or wandb (offline unless logged in)"
    )
    batch_size: int = _f(32, "samples per micro-batch per rank (a step sees batch_size x world x n_grad_loops)", ge=1)
    val_batch_size: Optional[int] = _f(None, "validation batch size over all ranks (each takes its share); null = "
                                       "batch_size", ge=1)
    n_grad_loops: int = _f(1, "micro-batches accumulated per optimizer step", ge=1)
    n_workers: int = _f(0, "data loader worker processes per rank", ge=0)
    lr: float = _f(5e-4, "peak learning rate of AdamW", gt=0)
    l2: float = _f(0.0, "AdamW weight decay (decoupled)", ge=0)
    grad_clip: float = _f(0.0, "clip the gradient norm to this value; 0 = no clipping", ge=0)
    warmup_steps: int = _f(0, "linear warmup steps from 0 to lr", ge=0)
    lr_schedule: Literal["cosine", "inverse_sqrt", "inverse_power", "constant", "plateau"] = _f(
        "cosine", "decay after warmup; inverse_power: lr x (warmup_steps / step) ** lr_decay_exp; plateau divides lr "
        "by 10 when val loss stalls for `patience` epochs"
    )
    lr_decay_exp: float = _f(0.5, "inverse_power: the decay exponent (the CoS paper's 0.1)", gt=0)
    min_lr: float = _f(0.0, "floor of the decaying learning rate", ge=0)
    patience: int = _f(5, "epochs without val-loss improvement before plateau lowers lr", ge=1)
    label_smoothing: float = _f(0.0, "label smoothing of the training loss (logged losses are plain CE)", ge=0, lt=1)
    # data windows and blotching
    cmp_len: Optional[int] = _f(None, "compression-part length; null = the manifest's (another value is an error)", ge=0)
    seq_len: Optional[int] = _f(None, "continuation length; null = the manifest's (another value is an error)", ge=1)
    separator_ids: Optional[list] = _f(None, "token ids that end a blotching segment; null = the manifest's")
    blotch_p: float = _f(0.3, "probability (random) or fraction (equal) of eligible segments blotched in training", ge=0, le=1)
    blotch_spacing: Literal["random", "equal"] = _f(
        "random", "random: each segment independently; equal: round(blotch_p*n) evenly spaced segments"
    )
    contig_blotches: bool = _f(True, "allow two adjacent segments to be blotched")
    blotch_tokens: bool = _f(False, "lead each window with a blotch-intensity token; its level's rate replaces blotch_p")
    blotch_p_min: float = _f(0.0, "blotch_tokens: the lowest level's rate", ge=0, le=1)
    blotch_p_max: float = _f(1.0, "blotch_tokens: the highest level's rate", ge=0, le=1)
    n_btokens: int = _f(11, "blotch_tokens: levels evenly spaced from blotch_p_min to blotch_p_max", ge=1)
    incl_intl_prob: bool = _f(False, "count targets inside the compression part in the loss")
    pad_pos_skip: bool = _f(True, "positions count kept tokens only; false: a token keeps its column in the window")
    # model
    model_type: Literal["transformer", "hf", "compressor"] = _f(
        "transformer", "transformer: from-scratch pre-LN causal; hf: a transformers causal LM; compressor: context compression"
    )
    d_model: int = _f(128, "model width", ge=1)
    n_heads: int = _f(4, "attention heads (must divide d_model)", ge=1)
    h_mult: int = _f(4, "MLP hidden width = h_mult x d_model", ge=1)
    n_layers: int = _f(3, "transformer blocks", ge=1)
    drop_p: float = _f(0.1, "dropout on embeddings, attention output and MLP", ge=0, lt=1)
    tie_weights: bool = _f(False, "share the token embedding with the output layer")
    posenc_type: Literal["SinPositionalEncoding", "RandPositionalEncoding"] = _f(
        "SinPositionalEncoding", "Rand: training positions are a sorted random subset of the table's rows"
    )
    max_posencs: Optional[int] = _f(None, "rows of the position table; null = 3 x (cmp_len + seq_len)", ge=1)
    posenc_drop_p: Optional[float] = _f(None, "dropout on the positional encodings; null = drop_p", ge=0, lt=1)
    learnable_posencs: bool = _f(False, "train the position table (a Parameter) instead of keeping it fixed")
    # model_type hf and compressor
    hf_model: Optional[str] = _f(
        None, "Hub id, local folder or .gguf file of a causal LM; with pretrained false also a model type (gpt2, llama)"
    )
    pretrained: bool = _f(False, "load hf_model's weights; false builds it from its config with hf_config overrides")
    hf_config: Optional[dict] = _f(None, "overrides of the hf_model config, e.g. {\"n_layer\": 4, \"n_embd\": 128}")
    n_cmps: int = _f(1, "compressor: learned vectors appended after the cmp part; their states are the compression", ge=1)
    cmp_layer: Union[int, Literal["half", "last"]] = _f("half", "compressor: hidden-state layer read at those vectors")
    proj_cmpr: bool = _f(False, "compressor: project the compressed states before decoding")
    proj_hid_mult: Optional[int] = _f(None, "compressor: null = one Linear projection; k = an MLP of width k x hidden", ge=1)
    rmb_task: bool = _f(False, "compressor: also reconstruct the compressed tokens from the compression")
    rmb_only: bool = _f(False, "compressor: train the reconstruction alone (no continuation targets)")
    train_base: bool = _f(False, "compressor: train the base LM too (default: frozen, only the new vectors learn)")
    # evaluation
    gen_val_samples: int = _f(64, "val samples decoded greedily from their cmp part at each validation; 0 = none", ge=0)
    # read by `python -m preprocess --config` only (it checks them); here so one file can drive both
    n_data_procs: Optional[int] = _f(None, "preprocess: tokenizer worker processes")
    tokenizer: Optional[str] = _f(None, "preprocess: Hugging Face tokenizer name or folder, or char")
    format: Optional[Literal["arrow", "webdataset"]] = _f(None, "preprocess: shard format")
    shard_size: Optional[int] = _f(None, "preprocess: target shard size in bytes")
    val_frac: Optional[float] = _f(None, "preprocess: fraction of text documents in val")
    max_docs: Optional[int] = _f(None, "preprocess: only the first N source documents")
    data_files: Union[str, list, None] = _f(None, "preprocess: local or fsspec files/globs of the source")
    glue_task: Optional[str] = _f(None, "preprocess: GLUE task")
    no_pack: Optional[bool] = _f(None, "preprocess: one truncated, padded window per document")
    overwrite: Optional[bool] = _f(None, "preprocess: rebuild an existing dataset folder")
    n_train: Optional[int] = _f(None, "preprocess: arithmetic train problems")
    n_val: Optional[int] = _f(None, "preprocess: arithmetic val problems")
    min_ents: Optional[int] = _f(None, "preprocess: fewest arithmetic operands")
    max_ents: Optional[int] = _f(None, "preprocess: most arithmetic operands")
    p_more_ents: Optional[float] = _f(None, "preprocess: each arithmetic operand beyond min_ents with this probability")
    max_num: Optional[int] = _f(None, "preprocess: arithmetic operands are drawn from [0, max_num)")
    p_mult: Optional[float] = _f(None, "preprocess: probability that an arithmetic operand is a product")
    max_mult_num: Optional[int] = _f(None, "preprocess: arithmetic right factors are drawn from [0, max_mult_num)")
    max_mult_left: Optional[int] = _f(None, "preprocess: arithmetic left factors are drawn from [0, max_mult_left)")

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self, public: bool = False) -> dict[str, Any]:
        """All keys; `public` drops the values of storage_options (they may hold credentials)."""
        d = dataclasses.asdict(self)
        if public and d["storage_options"]:
            d["storage_options"] = {k: "<redacted>" for k in d["storage_options"]}
        return d


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def dict_valued(key: str) -> bool:
    """Whether a config key holds a dict (hf_config, max_memory, storage_options): a sweep can set its entries."""
    hint = _HINTS[key]
    return hint is dict or dict in typing.get_args(hint)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(h) for h in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else hint.__name__


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _validate(cfg: Config) -> None:
    for name, f in FIELDS.items():
        value, hint = getattr(cfg, name), _HINTS[name]
        if not _type_ok(value, hint):
            raise ConfigError(f"config key {name!r}: {value!r} is not {type_name(hint)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for op, (ok, word) in _BOUNDS.items():
            if op in f.metadata and not ok(value, f.metadata[op]):
                raise ConfigError(f"config key {name!r}: {value!r} must be {word} {f.metadata[op]}")
    if cfg.separator_ids is not None and not all(isinstance(i, int) and i >= 0 for i in cfg.separator_ids):
        raise ConfigError(f"config key 'separator_ids': {cfg.separator_ids!r} must be a list of token ids")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"config key 'n_heads': {cfg.n_heads} does not divide d_model {cfg.d_model}")
    if cfg.model_parallel and cfg.multi_gpu:
        raise ConfigError("config keys 'model_parallel' and 'multi_gpu' do not combine (one sharded model vs one "
                          "replica per GPU); set one of them to false")
    if cfg.model_parallel and cfg.model_type == "transformer":
        raise ConfigError("config key 'model_parallel': needs model_type hf or compressor, not 'transformer'")
    if cfg.max_memory is not None and not cfg.model_parallel:
        raise ConfigError("config key 'max_memory': only used with model_parallel true")
    if cfg.model_type != "transformer" and not cfg.hf_model:
        raise ConfigError(f"config key 'hf_model': model_type {cfg.model_type} needs a Hub id, folder or model type")
    if cfg.blotch_tokens and cfg.blotch_p_min > cfg.blotch_p_max:
        raise ConfigError(f"config key 'blotch_p_min': {cfg.blotch_p_min} exceeds blotch_p_max {cfg.blotch_p_max}")
    if cfg.blotch_tokens and cfg.model_type == "compressor":
        raise ConfigError("config key 'blotch_tokens': not with model_type compressor (its cmp part is compressed)")
    if cfg.rmb_only and cfg.model_type != "compressor":
        raise ConfigError("config key 'rmb_only': only for model_type compressor")


def check_keys(d: dict[str, Any], source: str) -> None:
    for key in d:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` pairs; a value is read as JSON when it parses (1e-3, true, null, [5, 6]), else as a string."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: --{key} needs a value")
            raw, i = argv[i + 1], i + 1
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
        i += 1
    return out


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """The JSON object in a file; a missing file, invalid JSON or another type is a one-line error."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object")
    return d


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    d: dict[str, Any] = {}
    if path is not None:
        d = read_json_object(path, "config file")
        check_keys(d, path)
    check_keys(overrides or {}, "command line")
    return Config(**{**d, **(overrides or {})})


# What may change when resuming: where and how data is read, and how long to train. Anything else would make the
# resumed run a different experiment.
RESUME_KEYS = {"storage_options", "cache_dir", "cache_limit", "n_workers", "device", "n_epochs"}


def resume_config(folder: str, overrides: dict[str, Any]) -> Config:
    """A run folder's config (its hyperparams.json) with the overrides a resume allows."""
    path = os.path.join(folder, "hyperparams.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found: not a run folder")
    with open(path) as f:
        saved = json.load(f)
    saved.pop("world_size")
    saved["storage_options"] = None  # never saved (credentials); from the command line or the environment
    changed = sorted(set(overrides) - RESUME_KEYS)
    if changed:
        raise ConfigError(f"--resume: cannot change {changed}; only {sorted(RESUME_KEYS)}")
    return Config(**{**saved, **overrides})


def markdown_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append(f"| `{name}` | {type_name(_HINTS[name])} | `{json.dumps(default)}` | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m train.config --markdown")
    sys.stdout.write(markdown_table())
