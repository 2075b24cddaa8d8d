"""Readers for the official annotation files of each dataset, one module per format family.

Each reader is ``reader(paths, split, skips=None) -> list[Sample]``: ``paths`` maps the spec's file
roles to absolute paths, malformed records go to the ``SkipCounter``. Readers never open images.
"""
