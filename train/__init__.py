"""The trainer: config, data, blotching, models, loss, evaluation and the loop, each a small module (README, "Layout").

Imports nothing from `preprocess`; reads data only through `shards`.
"""
