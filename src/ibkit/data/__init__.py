"""Data: official annotation files -> ``Sample`` -> instruction text -> tensors.

Kept import-free so that ``import ibkit.data.registry`` stays cheap; import the submodules you need.
"""
