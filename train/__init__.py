"""The trainer: config, blotching, model, loss and the loop, each a small module.

Imports nothing from `preprocess`; reads data only through `shards`.
"""
