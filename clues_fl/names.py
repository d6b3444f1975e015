"""The names the run-config and the core share, in one torch-free place: config.py
checks values against them, and each registry of the core has exactly these
(tests/test_names.py)."""

DEFAULT_MODEL = "smollm2-135m"  # the bundled SmolLM2-135M-Instruct (model/loading.py)

SELECTION_METHODS = ("clues", "clues+", "quad", "less", "datainf", "ppl", "ifd", "random", "all", "oracle")
"""scoring/scorers.py BUILTIN."""

THRESHOLD_RULES = ("anchor-f1", "anchor-mean", "anchor-quantile", "mixture", "ratio", "static")
"""The rules selection.threshold takes (selection/rules.py RULES, which also has the
selections of the methods without an anchor threshold)."""

SIGNAL_NAMES = ("clues", "domain", "loss", "learn", "base-loss", "qinfo", "eos", "dup", "overlap", "qa-sim")
"""The built-in per-sample signals of `clues+` (scoring/signals.py SIGNALS)."""

# Chosen on the measurement pools and the demo's FedAvg checkpoints (benchmarks/signals.py,
# docs/selection.md): the signals that add. "loss" (the last checkpoint's) is left out: it
# moves with base-loss (the LoRA barely changes answer losses), so the two would count one
# shortfall twice. "qa-sim" replaced "overlap": on the four within-domain pools it ranked
# exchanged answers 0.94/0.93/0.89/0.94, overlap 0.88/0.86/0.85/0.80. "domain" (the
# questions' embedding similarity with the anchors') ranks another domain's samples at
# 0.991-0.994 alone and lets a dropped cross-domain sample's reason say so (docs/selection.md).
DEFAULT_SIGNALS = ("clues", "domain", "base-loss", "qinfo", "eos", "dup", "qa-sim")

MERGE_RULES = ("linear", "weighted", "ties")
"""aggregation/merging.py MERGE_RULES: the one-shot merge rules of retrain.mode = merge."""

FLOWER_STRATEGIES = ("FedAvg", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "FedAvgM", "FedMedian",
                     "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan", "QFedAvg")
"""The strategies of flwr.serverapp.strategy that aggregate adapters, by name for
fed.strategy (Flower's DP wrappers are not in this list: privacy.adapter-noise wraps the
chosen strategy in one; the XGBoost strategies aggregate trees)."""
