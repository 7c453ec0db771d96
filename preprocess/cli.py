"""`python -m preprocess --dataset NAME [options]`: options from flags or `--config cfg.json` (the trainer's
config file: keys this command does not know are left to the trainer), flags winning over the file."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from preprocess.arithmetic import ArithmeticParams
from preprocess.pipeline import UNIT_SIZE, Job, run
from preprocess.sources import DATASETS, SourceError, arithmetic_source, glue_source, text_source
from preprocess.tokenizer import CHAR_TOKENIZER, load_tokenizer
from shards.manifest import FORMATS

# Per-dataset defaults for what differs between them; everything else has one default below.
DATASET_DEFAULTS = {
    "arithmetic": {"tokenizer": CHAR_TOKENIZER, "cmp_len": 16, "seq_len": 256},
    "glue": {"tokenizer": "gpt2", "cmp_len": 64, "seq_len": 64},
    "text": {"tokenizer": "gpt2", "cmp_len": 64, "seq_len": 960},
}
MAX_WINDOW = 1 << 20
EXECUTORS = ("local", "ray")


def dataset_defaults(dataset: str) -> dict[str, Any]:
    return DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["text"])


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes end with one line that names the flag, like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m preprocess --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(prog="python -m preprocess", description=__doc__)
    a = p.add_argument
    a("--config", help="JSON config file (the trainer's); flags override its keys")
    a("--dataset", choices=DATASETS, help="what to tokenize")
    a("--data_root", help="output root: local path or fsspec URL (default ./data)")
    a("--name", help="output folder under data_root (default: the dataset name)")
    a("--tokenizer", help="Hugging Face tokenizer: Hub name or local folder (default: char for arithmetic, else gpt2)")
    a("--cmp_len", type=int, help="tokens of the compression part (the initial problem) of each window")
    a("--seq_len", type=int, help="tokens of the continuation of each window")
    a("--n_data_procs", type=int, help="tokenizer worker processes (default 1); output is identical for any value")
    a("--format", choices=FORMATS, help="shard format (default arrow)")
    a("--shard_size", type=int, help="target shard size in bytes (default 67108864)")
    a("--val_frac", type=float, help="text sources: fraction of documents in val (default 0.01)")
    a("--seed", type=int, help="seed of the train/val split and the arithmetic generator (default 0)")
    a("--max_docs", type=int, help="only the first N source documents (a quick subset)")
    a("--data_files", nargs="+", help="local or fsspec files/globs; glue: train=FILES validation=FILES")
    a("--storage_options", type=json.loads, help="JSON dict for fsspec (credentials are never written out)")
    a("--glue_task", help="GLUE task (default mrpc)")
    a("--no_pack", action="store_true", default=None, help="one truncated, padded window per document")
    a("--overwrite", action="store_true", default=None, help="delete an existing output and rebuild it")
    a("--executor", choices=EXECUTORS, help="local (default): this machine's processes; ray: a Ray cluster, same bytes")
    a("--address", help="ray: a running cluster's address (default: start a local Ray instance)")
    a("--unit_size", type=int, help=f"ray: input bytes per work unit (default {UNIT_SIZE}); output is identical for any value")
    g = p.add_argument_group("arithmetic generator")
    g.add_argument("--n_train", type=int, help="train problems (default 20000)")
    g.add_argument("--n_val", type=int, help="val problems, never in train (default 1000)")
    g.add_argument("--min_ents", type=int, help="fewest operands (default 2)")
    g.add_argument("--max_ents", type=int, help="most operands (default 3)")
    g.add_argument("--p_more_ents", type=float,
                   help="each operand beyond min_ents with this probability (default: a uniform count)")
    g.add_argument("--max_num", type=int, help="operands are drawn from [0, max_num) (default 1000)")
    g.add_argument("--p_mult", type=float, help="probability that an operand is a product (default 0)")
    g.add_argument("--max_mult_num", type=int, help="right factors are drawn from [0, max_mult_num) (default 10)")
    g.add_argument("--max_mult_left", type=int, help="left factors are drawn from [0, max_mult_left) (default max_num)")
    return p


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Flags over config file over defaults."""
    opts: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
        known = {k for k in vars(args) if k != "config"}
        opts.update({k: v for k, v in cfg.items() if k in known})
    opts.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    if "dataset" not in opts:
        raise ValueError(f"--dataset is required (one of {', '.join(DATASETS)})")
    defaults = {
        "data_root": "./data", "name": opts["dataset"], "n_data_procs": 1, "format": "arrow",
        "shard_size": 1 << 26, "val_frac": 0.01, "seed": 0, "max_docs": None, "data_files": None,
        "storage_options": None, "glue_task": "mrpc", "no_pack": False, "overwrite": False,
        "executor": "local", "address": None, "unit_size": UNIT_SIZE,
        **dataset_defaults(opts["dataset"]),
    }
    return {**defaults, **opts}


def check(o: dict[str, Any]) -> None:
    def bad(key: str, why: str) -> None:
        raise ValueError(f"--{key} {o[key]!r}: {why}")

    for key in ("cmp_len", "seq_len"):
        if not isinstance(o[key], int) or o[key] < 1:
            bad(key, "must be a positive integer")
    if o["cmp_len"] + o["seq_len"] > MAX_WINDOW:
        bad("seq_len", f"cmp_len + seq_len must be at most {MAX_WINDOW}")
    if o["n_data_procs"] < 1 or o["n_data_procs"] > (os.cpu_count() or 1) * 4:
        bad("n_data_procs", f"must be between 1 and {(os.cpu_count() or 1) * 4}")
    if o["shard_size"] < 1024:
        bad("shard_size", "must be at least 1024 bytes")
    if not 0 <= o["val_frac"] < 1:
        bad("val_frac", "must be in [0, 1)")
    if o["max_docs"] is not None and o["max_docs"] < 1:
        bad("max_docs", "must be positive")
    if isinstance(o["data_files"], str):
        o["data_files"] = [o["data_files"]]
    if o["storage_options"] is not None and not isinstance(o["storage_options"], dict):
        bad("storage_options", "must be a JSON object")
    if "/" in o["name"] or not o["name"]:
        bad("name", "must be a plain folder name")
    if o["executor"] not in EXECUTORS:
        bad("executor", f"must be one of {', '.join(EXECUTORS)}")
    if o["address"] is not None and o["executor"] != "ray":
        bad("address", "needs --executor ray")
    if not isinstance(o["unit_size"], int) or not 1024 <= o["unit_size"] <= 1 << 30:
        bad("unit_size", "must be between 1024 bytes and 1 GiB")


def make_job(o: dict[str, Any]) -> Job:
    dataset = o["dataset"]
    extra: dict[str, Any] = {}
    if dataset == "arithmetic":
        fields = ArithmeticParams.__dataclass_fields__
        ap = ArithmeticParams(**{k: o[k] for k in fields if o.get(k) is not None})
        if (ap.min_ents < 1 or ap.max_ents < ap.min_ents or ap.max_num < 1 or not 0 <= ap.p_mult <= 1
                or ap.max_mult_num < 1 or (ap.max_mult_left is not None and ap.max_mult_left < 1)
                or (ap.p_more_ents is not None and not 0 <= ap.p_more_ents <= 1)):
            raise ValueError(f"arithmetic parameters out of range: {ap}")
        source = arithmetic_source(ap, o["seed"])
        extra["arithmetic"] = {k: getattr(ap, k) for k in fields}
    elif dataset == "glue":
        source = glue_source(o["glue_task"], o["data_files"], o["storage_options"])
        extra["glue_task"] = o["glue_task"]
    else:
        source = text_source(dataset, o["data_files"], o["storage_options"])
    return Job(
        dataset=dataset, name=o["name"], data_root=o["data_root"], storage_options=o["storage_options"],
        source=source, tokenizer=load_tokenizer(o["tokenizer"]), tokenizer_name=o["tokenizer"],
        cmp_len=o["cmp_len"], seq_len=o["seq_len"], fmt=o["format"], shard_size=o["shard_size"],
        n_data_procs=o["n_data_procs"], seed=o["seed"], val_frac=o["val_frac"], max_docs=o["max_docs"],
        pack=not o["no_pack"], overwrite=o["overwrite"], extra_params=extra, executor=o["executor"],
        address=o["address"], unit_size=o["unit_size"],
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = resolve(args)
        check(opts)
        run(make_job(opts))
    except (ValueError, SourceError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
