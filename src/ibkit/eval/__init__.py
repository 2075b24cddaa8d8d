"""Evaluation: torchmetrics metrics and the per-dataset evaluation protocol."""
