"""Offline tokenization into verified, deterministic shards: `python -m preprocess --dataset NAME`."""
