"""The server's own data: the public anchor set, encoded for the model the selection runs
with, and the clean validation and test sets for the trained model, with their prefix
caches."""

from __future__ import annotations

from dataclasses import dataclass, field

from clues_fl.config import RunConfig


@dataclass
class ServerData:
    """`anchor_samples` keep their text (clues+ computes text signals from it); `anchors`
    and `val` are encoded; `test` stays raw (answers are generated for it)."""

    anchor_samples: list
    anchors: list
    val: list
    test: list = field(default_factory=list)
    anchor_cache: object = None
    val_cache: object = None

    @classmethod
    def build(cls, cfg: RunConfig, bench, anchor_samples, val_samples, test_samples=None,
              selection_bench=None) -> ServerData:
        """`bench`: the trained model's workbench; `selection_bench`: the scoring model's
        (default: the same), which the anchors are encoded and cached for."""
        selection_bench = selection_bench or bench
        anchors = selection_bench.encode(list(anchor_samples), cfg)
        val = bench.encode(list(val_samples), cfg)
        return cls(list(anchor_samples), anchors, val, list(test_samples or []),
                   anchor_cache=selection_bench.cache(anchors, cfg, desc="anchor prefix cache"),
                   val_cache=bench.cache(val, cfg, desc="validation prefix cache"))
