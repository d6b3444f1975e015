"""Aggregation: the Flower strategy for rounds (fed.strategy) and the one-shot merge rules."""
