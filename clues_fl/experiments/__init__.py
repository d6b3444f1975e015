"""Experiments: the evaluation suite."""
