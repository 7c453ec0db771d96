"""Document sources. Each yields `Doc`s in a fixed order, streamed so no corpus is held in memory.

Text sources (openwebtext, text, json, parquet) yield documents without a split: the pipeline assigns
train/val per document from the seed. Pair sources (glue, arithmetic) carry their own splits.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
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


@dataclass(frozen=True)
class InputFile:
    url: str
    split: str | None = None  # glue: the split every record of the file belongs to; None for text sources


@dataclass(frozen=True)
class Reader:
    """How a source's records become `Doc`s: the `datasets` builder, its options and the record checks.

    Small and picklable on purpose: a Ray worker reads its share of the files with this same object, so every
    executor turns the same bytes into the same documents."""

    builder: str
    kind: str  # "text": records with a 'text' field; "pair": GLUE's sentence1, sentence2, label
    what: str  # names the input in errors
    hint: str
    options: tuple[tuple[str, Any], ...] = ()  # extra load_dataset keywords, e.g. (("sample_by", "document"),)

    def doc(self, rec: dict, i: int, split: str | None, what: str | None = None) -> Doc:
        """One record as a Doc; a record without the fields this source needs is an error naming it."""
        what = what or self.what
        if self.kind == "text":
            if not isinstance(rec.get("text"), str):  # JSON readers fill a field some records lack with None
                fields = sorted(k for k, v in rec.items() if v is not None)
                raise SourceError(f"{what}: record {i} has no 'text' field with a string (fields: {fields})")
            return Doc(split=None, text=rec["text"])
        missing = {"sentence1", "sentence2", "label"} - set(rec)
        if missing:
            raise SourceError(f"{what} {GLUE_SPLITS[split]} record {i}: missing {sorted(missing)} (fields: {sorted(rec)})")
        return Doc(split=split, text=rec["sentence1"], second=rec["sentence2"], label=int(rec["label"]))

    def docs(self, files: Sequence[InputFile] | None, storage_options: dict | None) -> Iterator[Doc]:
        """The documents of `files` in order (one `datasets` stream per split), or of the Hub dataset when None."""
        splits: list[str | None] = list(GLUE_SPLITS) if self.kind == "pair" else [None]
        for split in splits:
            kwargs: dict[str, Any] = {"split": GLUE_SPLITS[split] if split else "train", **dict(self.options)}
            if files is not None:
                urls = [f.url for f in files if f.split == split]
                if not urls:
                    continue
                kwargs["data_files"] = {kwargs["split"]: urls} if split else urls
                kwargs["storage_options"] = storage_options
            for i, rec in enumerate(_stream(self.builder, what=self.what, hint=self.hint, **kwargs)):
                yield self.doc(rec, i, split)


@dataclass
class Source:
    kind: str  # "text" or "pair"
    docs: Any  # a callable returning an iterator of Doc
    total: int | None  # documents, when known, for the progress bar
    columns: dict[str, str]
    description: dict[str, Any]  # what identifies the input, recorded in the manifest's params
    # File sources: the files in reading order and how to read any run of them. An executor that splits the work
    # (--executor ray) cuts `files` into units; a source without files (the Hub, the generator) is one stream.
    files: tuple[InputFile, ...] = ()
    reader: Reader | None = None
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
        options = (("sample_by", "document"),) if builder == "text" else ()  # text: one document per file
        reader = Reader(builder, "text", f"--data_files {data_files}",
                        "check the files (a 'text' column for json/parquet)", options)
        inputs: tuple[InputFile, ...] = tuple(InputFile(f) for f in files)
        description = {"builder": builder, "data_files": data_files}
    elif dataset == "openwebtext":
        reader = Reader(OPENWEBTEXT_HUB, "text", f"{OPENWEBTEXT_HUB} from the Hugging Face Hub",
                        "offline? pass --data_files with a local or s3 copy (jsonl or parquet with a 'text' column)")
        inputs = ()
        description = {"hub": OPENWEBTEXT_HUB}
    else:
        raise SourceError(f"--dataset {dataset} needs --data_files (a glob or list of files)")
    return Source("text", lambda: reader.docs(inputs or None, storage_options), None, {}, description, inputs,
                  reader if inputs else None)


def glue_source(task: str, data_files: list[str] | None, storage_options: dict | None) -> Source:
    """GLUE's official train and validation splits; sentence1 is compressed, sentence2 continues it."""
    if data_files:
        named = dict(item.split("=", 1) for item in data_files if "=" in item)
        if set(named) != {"train", "validation"}:
            raise SourceError("--data_files for glue must be: train=FILES validation=FILES")
        inputs = tuple(InputFile(f, split) for split, hf_split in GLUE_SPLITS.items()
                       for f in expand_data_files([named[hf_split]], storage_options))
        reader = Reader(_files_builder([inputs[0].url], "glue"), "pair", f"--data_files {data_files}",
                        "files need sentence1, sentence2, label columns")
        description = {"builder": reader.builder, "data_files": named}
    else:
        reader = Reader(GLUE_HUB, "pair", f"{GLUE_HUB}/{task} from the Hugging Face Hub",
                        "offline? pass --data_files train=FILE validation=FILE with the GLUE columns", (("name", task),))
        inputs = ()
        description = {"hub": GLUE_HUB, "task": task}
    return Source("pair", lambda: reader.docs(inputs or None, storage_options), None, {"label": "int64"}, description,
                  inputs, reader if inputs else None)


def arithmetic_source(params: ArithmeticParams, seed: int) -> Source:
    def docs() -> Iterator[Doc]:
        for split, problem, solution in generate(params, seed):
            yield Doc(split=split, text=problem + "=", second=solution)

    return Source("pair", docs, params.n_train + params.n_val, {}, {"generator": "arithmetic"}, answers=True)
