"""In-domain wrong answers, ranked by the trained model for itself and by a scoring model.

The smoke scenario's exchanged answers (an answer written for another question of the
same domain) on a larger pool: the
trained model (SmolLM2-135M) scoring for itself and a scoring model scoring for it, both
with CLUES and the `mixture` rule, run in-process (the real ClientApp and strategy over an
in-memory grid, no all-data reference); then benchmarks/scoring_model.py's comparison.

    python benchmarks/scoring_model_exchange.py --scoring-model GEMMA.gguf --scoring-layers 10-17 --out /tmp/exchange
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

from flwr.common.config import flatten_dict

REPO = Path(__file__).resolve().parent.parent
POOL = {"data.samples-per-client": 40, "data.max-length": 96, "data.val-size": 24, "eval.max-samples": 0,
        "eval.mc-items": 0, "selection.method": "clues", "selection.threshold": "mixture"}


def main() -> None:
    from clues_fl.experiments.suite import Lab

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scoring-model", required=True, help="scoring.model of the second run")
    parser.add_argument("--scoring-layers", default="top8", help="its scoring.model-layers")
    parser.add_argument("--out", type=Path, required=True, help="folder for the two runs")
    args = parser.parse_args()
    smoke = flatten_dict(tomllib.loads((REPO / "scenarios" / "smoke.toml").read_text()))
    smoke.pop("run-name")
    runs = {"self": {}, "scored": {"scoring.model": args.scoring_model, "scoring.model-layers": args.scoring_layers}}
    for name, extra in runs.items():
        start = time.time()
        Lab({**smoke, **POOL, **extra}, args.out / name, fresh=True).run(name)
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scoring_model

    scoring_model.compare(args.out / "self" / "runs" / "self", args.out / "scored" / "runs" / "scored")


if __name__ == "__main__":
    main()
