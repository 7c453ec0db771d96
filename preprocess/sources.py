"""Document sources. Each yields `Doc`s in a fixed order, streamed so no corpus is held in memory.

Text sources (openwebtext, text, json, parquet) yield documents without a split: the pipeline assigns
train/val per document from the seed. Pair sources (glue, arithmetic) carry their own splits.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from preprocess.arithmetic import ArithmeticParams, generate
from shards.storage import first_line

OPENWEBTEXT_HUB = "Skylion007/openwebtext"  # the Parquet-backed id current `datasets` loads (no script)
GLUE_HUB = "nyu-mll/glue"
TEXT_DATASETS = ("openwebtext", "text", "json", "parquet")
PAIR_DATASETS = ("glue", "arithmetic")
DATASETS = TEXT_DATASETS + PAIR_DATASETS
GLUE_SPLITS = {"train": "train", "val": "validation"}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class SourceError(ValueError):
    """The data cannot be read; the message names the dataset or file and suggests the fix."""


@dataclass
class Doc:
    split: str | None  # None for text sources: assigned by the pipeline
    text: str  # the document, or the first part of a pair
    second: str = ""
    label: int | None = None


@dataclass
class Source:
    kind: str  # "text" or "pair"
    docs: Any  # a callable returning an iterator of Doc
    total: int | None  # documents, when known, for the progress bar
    columns: dict[str, str]
    description: dict[str, Any]  # what identifies the input, recorded in the manifest's params
    answers: bool = False  # each document is a problem whose second part ends in its final answer

    def __iter__(self) -> Iterator[Doc]:
        return self.docs()


def expand_data_files(patterns: list[str], storage_options: dict | None) -> list[str]:
    """Globs to a sorted list of URLs; an empty match is an error that names the pattern."""
    import fsspec

    files: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
        matched = sorted(fs.glob(path)) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
        if not matched:
            raise SourceError(f"--data_files {pattern!r} matches no file")
        files += [fs.unstrip_protocol(m) if "://" in pattern else m for m in matched]
    return files


def _stream(builder: str, *, what: str, hint: str, **kwargs) -> Iterator[dict]:
    """Iterate a `datasets` streaming dataset, turning every failure into one SourceError line.

    Reads in batches of columns: per-record iteration costs more than tokenizing (15x slower on jsonl)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, streaming=True, **kwargs)
        for batch in ds.iter(batch_size=1024):
            columns = list(batch)
            yield from (dict(zip(columns, row)) for row in zip(*batch.values()))
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"cannot read {what} ({first_line(e)}); {hint}") from None


def _files_builder(files: list[str], dataset: str) -> str:
    if dataset in ("json", "parquet", "text"):
        return dataset
    ext = os.path.splitext(files[0].removesuffix(".gz").removesuffix(".zst"))[1]
    if ext not in FILE_BUILDERS:
        raise SourceError(f"--data_files {files[0]!r}: unknown extension {ext!r}, expected one of {sorted(FILE_BUILDERS)}")
    return FILE_BUILDERS[ext]


def text_source(dataset: str, data_files: list[str] | None, storage_options: dict | None) -> Source:
    if data_files:
        files = expand_data_files(data_files, storage_options)
        builder = _files_builder(files, dataset)
        kwargs: dict[str, Any] = {"data_files": files, "split": "train", "storage_options": storage_options}
        if builder == "text":
            kwargs["sample_by"] = "document"  # one document per file
        what, hint = f"--data_files {data_files}", "check the files (a 'text' column for json/parquet)"
        description = {"builder": builder, "data_files": data_files}
    elif dataset == "openwebtext":
        builder, kwargs = OPENWEBTEXT_HUB, {"split": "train"}
        what = f"{OPENWEBTEXT_HUB} from the Hugging Face Hub"
        hint = "offline? pass --data_files with a local or s3 copy (jsonl or parquet with a 'text' column)"
        description = {"hub": OPENWEBTEXT_HUB}
    else:
        raise SourceError(f"--dataset {dataset} needs --data_files (a glob or list of files)")

    def docs() -> Iterator[Doc]:
        for i, rec in enumerate(_stream(builder, what=what, hint=hint, **kwargs)):
            if "text" not in rec:
                raise SourceError(f"{what}: record {i} has no 'text' field (fields: {sorted(rec)})")
            yield Doc(split=None, text=rec["text"])

    return Source("text", docs, None, {}, description)


def glue_source(task: str, data_files: list[str] | None, storage_options: dict | None) -> Source:
    """GLUE's official train and validation splits; sentence1 is compressed, sentence2 continues it."""
    if data_files:
        named = dict(item.split("=", 1) for item in data_files if "=" in item)
        if set(named) != {"train", "validation"}:
            raise SourceError("--data_files for glue must be: train=FILES validation=FILES")
        files = {k: expand_data_files([v], storage_options) for k, v in named.items()}
        builder = _files_builder(files["train"], "glue")
        base = {"data_files": files, "storage_options": storage_options}
        what, hint = f"--data_files {data_files}", "files need sentence1, sentence2, label columns"
        description = {"builder": builder, "data_files": named}
    else:
        builder, base = GLUE_HUB, {"name": task}
        what = f"{GLUE_HUB}/{task} from the Hugging Face Hub"
        hint = "offline? pass --data_files train=FILE validation=FILE with the GLUE columns"
        description = {"hub": GLUE_HUB, "task": task}

    def docs() -> Iterator[Doc]:
        for split, hf_split in GLUE_SPLITS.items():
            for i, rec in enumerate(_stream(builder, what=what, hint=hint, split=hf_split, **base)):
                missing = {"sentence1", "sentence2", "label"} - set(rec)
                if missing:
                    raise SourceError(f"{what} {hf_split} record {i}: missing {sorted(missing)} (fields: {sorted(rec)})")
                yield Doc(split=split, text=rec["sentence1"], second=rec["sentence2"], label=int(rec["label"]))

    return Source("pair", docs, None, {"label": "int64"}, description)


def arithmetic_source(params: ArithmeticParams, seed: int) -> Source:
    def docs() -> Iterator[Doc]:
        for split, problem, solution in generate(params, seed):
            yield Doc(split=split, text=problem + "=", second=solution)

    return Source("pair", docs, params.n_train + params.n_val, {}, {"generator": "arithmetic"}, answers=True)
