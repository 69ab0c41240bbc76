"""Experiments built on the core: ``compare`` (estimators side by side) and ``reproduce`` (the paper's grid)."""
