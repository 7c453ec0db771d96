"""The data side of a run: the dataset's manifest checked against the config, the loaders, the train stream.

Data is read only through `shards` (never `preprocess`): `<data_root>/<name or dataset>`, a local folder or any
fsspec URL. The window shape, vocabulary, padding and separators come from the manifest, so a config cannot
silently disagree with the data it trains on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from shards import Manifest, StreamingDataLoader, StreamingDataset, load_manifest, storage
from train.blotch import BlotchSpec
from train.config import Config, ConfigError

SPLITS = ("train", "val")  # what a run reads


def dataset_url(cfg: Config) -> str:
    return storage.join(cfg.data_root, cfg.name or cfg.dataset)


def resolve(cfg: Config, m: Manifest, url: str) -> Config:
    """Fill cmp_len, seq_len and separator_ids from the manifest; a config value that differs is an error."""
    for key in ("cmp_len", "seq_len"):
        mine, theirs = getattr(cfg, key), getattr(m, key)
        if mine is not None and mine != theirs:
            raise ConfigError(f"config key {key!r}: {mine} differs from {theirs} in {url}/manifest.json "
                              f"(omit it to use the dataset's)")
    seps = m.separator_ids if cfg.separator_ids is None else cfg.separator_ids
    bad = [s for s in seps if s >= m.vocab_size]
    if bad:
        raise ConfigError(f"config key 'separator_ids': {bad} outside the vocabulary of {m.vocab_size} ({url})")
    return cfg.replace(cmp_len=m.cmp_len, seq_len=m.seq_len, separator_ids=list(seps))


def blotch_spec(cfg: Config, m: Manifest) -> BlotchSpec:
    return BlotchSpec(
        cmp_len=m.cmp_len, pad_id=m.pad_id, eos_id=m.eos_id, layout=m.layout,
        separator_ids=tuple(cfg.separator_ids), blotch_p=cfg.blotch_p, spacing=cfg.blotch_spacing,
        contig=cfg.contig_blotches, incl_intl_prob=cfg.incl_intl_prob, pad_pos_skip=cfg.pad_pos_skip, seed=cfg.seed,
        levels=blotch_levels(cfg), level_token0=m.vocab_size,
    )


def blotch_levels(cfg: Config) -> tuple[float, ...]:
    """The blotch-intensity levels: n_btokens rates evenly spaced from blotch_p_min to blotch_p_max, both
    included; () without blotch_tokens. Their tokens follow the dataset's vocabulary."""
    if not cfg.blotch_tokens:
        return ()
    n, lo, hi = cfg.n_btokens, cfg.blotch_p_min, cfg.blotch_p_max
    return tuple(lo + (hi - lo) * i / max(n - 1, 1) for i in range(n))


def open_manifest(cfg: Config) -> tuple[Manifest, str]:
    url = dataset_url(cfg)
    fs, root = storage.open_fs(url, cfg.storage_options)
    return load_manifest(fs, root), url


def rng_neutral(batches: Iterable) -> Iterator:
    """Iterate without touching the global RNG: a DataLoader iterator draws a seed from it (lazily, at the
    first batch), and a resumed run starts a new iterator where the uninterrupted run did not."""
    it = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(it)
            except StopIteration:
                return
        yield batch


class TrainStream:
    """Micro-batches forever: pass after pass over the train split, each batch tagged with its pass number.

    The stream continues across trainer epochs (an epoch is a number of steps, not a pass), so the tail of a
    pass is always visited. Its state is the loader's, which counts only batches already handed out.
    """

    def __init__(self, dl):
        self.dl, self._it, self._pass = dl, None, 0

    def next(self) -> tuple[int, dict[str, torch.Tensor]]:
        while True:
            if self._it is None:
                self._pass = self.dl.dataset.epoch
                self._it = rng_neutral(self.dl)
            try:
                return self._pass, next(self._it)
            except StopIteration:
                self._it = None

    def state_dict(self) -> dict[str, Any]:
        return self.dl.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dl.load_state_dict(state)
        self._it = None


@dataclass
class Source:
    """A config resolved against its dataset's manifest, and the blotching they define. A process opens it once
    (one manifest GET on object storage) and hands it on: `python -m train` checks it before any run folder
    exists, then the loop builds its loaders from it."""
    cfg: Config  # resolved against the manifest
    manifest: Manifest
    url: str
    spec: BlotchSpec

    @property
    def has_answers(self) -> bool:
        """Whether each window holds one problem and its worked solution ending in a final answer (the manifest
        says so: arithmetic); GLUE pairs and text have no final answer to score."""
        return self.manifest.answers


def open_source(cfg: Config, splits: Iterable[str]) -> Source:
    """Fetch the manifest, resolve the config against it, and check that the dataset has `splits`."""
    m, url = open_manifest(cfg)
    cfg = resolve(cfg, m, url)
    for split in splits:
        m.split(split)
    return Source(cfg, m, url, blotch_spec(cfg, m))


def loader(src: Source, split: str, batch_size: int, shuffle: bool, rank: int, world: int, batch_key: str
           ) -> StreamingDataLoader:
    """The split's streaming loader for this rank, `batch_size` samples a batch; `batch_key` names the config key
    that sizes them, for errors."""
    cfg = src.cfg
    ds = StreamingDataset(src.url, split, shuffle=shuffle, seed=cfg.seed, rank=rank, world_size=world,
                          batch_size=batch_size, storage_options=cfg.storage_options, cache_dir=cfg.cache_dir,
                          cache_limit=cfg.cache_limit, shuffle_block=cfg.shuffle_block, manifest=src.manifest)
    dl = StreamingDataLoader(ds, batch_size=batch_size, num_workers=cfg.n_workers)
    if len(dl) == 0:
        raise ConfigError(f"{src.url} split {split!r}: {ds.total} samples make no batch of {batch_size} on each "
                          f"of {world} ranks; lower {batch_key}")
    return dl


def eval_loader(src: Source, split: str, rank: int, world: int) -> StreamingDataLoader:
    """The split in order, in global batches of val_batch_size split over the ranks: what validation and
    `python -m train.eval` read. Global, so that 1 and N ranks validate on the same samples."""
    global_batch = src.cfg.val_batch_size or src.cfg.batch_size
    if global_batch % world:
        raise ConfigError(f"config key 'val_batch_size': {global_batch} (a global batch) is not divisible by the "
                          f"{world} ranks")
    return loader(src, split, global_batch // world, False, rank, world, "val_batch_size")


@dataclass
class Data:
    """A run's dataset and this rank's loaders of its splits."""
    source: Source
    train: StreamingDataLoader
    val: StreamingDataLoader


def open_data(src: Source, rank: int, world: int) -> Data:
    train = loader(src, "train", src.cfg.batch_size, True, rank, world, "batch_size")
    return Data(src, train, eval_loader(src, "val", rank, world))
