"""Scoring: per-sample scores (CLUES gradient alignment, the calibrated multi-signal clues+, baselines, Quad), plain torch."""
