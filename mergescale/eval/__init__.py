"""Evaluation: task registry, rank-classification and generation scoring backends, normalized metrics."""
