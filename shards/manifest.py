"""The manifest: the one file that says what a dataset folder holds and how to read its windows.

It is written last, so its presence means the folder is complete. Paths inside it are relative, so a folder
can be copied to object storage as it is. It holds no timestamps: the same inputs give the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from shards import storage

FORMAT_VERSION = 2  # 2 added `answers`; a version-1 manifest is read with answers inferred (only arithmetic had them)
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
FORMATS = ("arrow", "webdataset")
LAYOUTS = ("packed", "padded")
SHARD_SUFFIX = {"arrow": ".arrow", "webdataset": ".tar"}


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent; the message names the file."""


@dataclass
class ShardInfo:
    path: str  # relative to the dataset folder, e.g. "train/shard-00000.arrow"
    samples: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    windows: int = 0
    tokens_dropped: int = 0
    too_long: int = 0

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class Manifest:
    name: str
    format: str
    cmp_len: int
    seq_len: int
    dtype: str  # "uint16" or "uint32"
    vocab_size: int
    pad_id: int
    eos_id: int
    separator_ids: list[int]
    # "packed": windows cut from one concatenated token stream, no padding anywhere.
    # "padded": the cmp part is left-padded and the seq part right-padded with pad_id (pairs, --no_pack);
    # in the seq part everything after the first eos is padding (pad_id may equal eos_id, as for GPT-2).
    layout: str
    columns: dict[str, str]  # extra per-sample columns besides input_ids, e.g. {"label": "int64"}
    tokenizer: dict[str, str]  # {"name": ..., "sha256": ..., "path": "tokenizer"}
    params: dict[str, Any]
    splits: dict[str, SplitInfo]
    package_version: str
    # Each window holds one problem and its worked solution, ending in a final answer after the last separator
    # (arithmetic): what answer accuracy and solution steps are scored on. GLUE pairs and text have none.
    answers: bool = False
    format_version: int = FORMAT_VERSION

    @property
    def window(self) -> int:
        return self.cmp_len + self.seq_len

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> "Manifest":
        try:
            if d.get("format_version") not in READABLE_VERSIONS:
                raise ManifestError(
                    f"{source}: format_version {d.get('format_version')!r} is not one of {READABLE_VERSIONS}; "
                    "re-run preprocess with --overwrite"
                )
            if d["format_version"] == 1:
                d = {**d, "answers": d["params"].get("dataset") == "arithmetic", "format_version": FORMAT_VERSION}
            splits = {
                name: SplitInfo(**{**s, "shards": [ShardInfo(**x) for x in s["shards"]]})
                for name, s in d["splits"].items()
            }
            m = cls(**{**d, "splits": splits})
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{source}: malformed manifest ({e})") from e
        if m.layout not in LAYOUTS:
            raise ManifestError(f"{source}: unknown layout {m.layout!r}, expected one of {LAYOUTS}")
        if m.format not in FORMATS:
            raise ManifestError(f"{source}: unknown format {m.format!r}, expected one of {FORMATS}")
        return m

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"split {name!r} not in manifest; available: {sorted(self.splits)}")
        return self.splits[name]


def load_manifest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest:
    path = storage.join(root, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(fs, path)
    except FileNotFoundError:
        raise ManifestError(
            f"{storage.display_url(fs, path)} not found: not a finished dataset folder (run `python -m preprocess`)"
        ) from None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{storage.display_url(fs, path)}: invalid JSON ({e})") from e
    return Manifest.from_dict(d, source=storage.display_url(fs, path))


def save_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    storage.write_atomic(fs, storage.join(root, MANIFEST_NAME), manifest.to_json().encode())


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"
