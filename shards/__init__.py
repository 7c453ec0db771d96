"""Shard format (manifest, Arrow/WebDataset encodings, writer) and the streaming reader.

Imports neither `preprocess` nor `train`: both depend on this package, never the other way round.
"""
from shards.manifest import Manifest, ManifestError, ShardInfo, SplitInfo, load_manifest, save_manifest
from shards import formats, storage
from shards.writer import ShardWriter

__all__ = ["Manifest", "ManifestError", "ShardInfo", "SplitInfo", "ShardWriter", "load_manifest", "save_manifest"]
