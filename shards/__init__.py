"""Shard format (manifest, Arrow/WebDataset encodings, writer) and the streaming reader.

Imports neither `preprocess` nor `train`: both depend on this package, never the other way round.
"""
from shards.manifest import Manifest, ManifestError, ShardInfo, SplitInfo, load_manifest, save_manifest
from shards import formats, storage
from shards.writer import ShardWriter

__all__ = [
    "Manifest", "ManifestError", "ShardInfo", "SplitInfo", "ShardWriter", "StreamingDataLoader", "StreamingDataset",
    "load_manifest", "save_manifest",
]


def __getattr__(name: str):
    """The reader needs torch; the format tools (`python -m shards verify`) must work without importing it."""
    if name == "StreamingDataset":
        from shards.dataset import StreamingDataset
        return StreamingDataset
    if name == "StreamingDataLoader":
        from shards.loader import StreamingDataLoader
        return StreamingDataLoader
    raise AttributeError(f"module 'shards' has no attribute {name!r}")
