"""Quad vs CLUES vs random at equal selection budget, at the demo's size: 4 sites x 80
FiQA samples polluted 80/20/10/50% (cross-domain), LoRA on q,k,v,o of layers 22-29,
3 trace and 2 retraining rounds. CLUES runs first; its kept share is the budget of
Quad, of CLUES top-k and of random on every site. Writes outputs/quad-demo-size/report.md
(about 25 min on 2 CPU cores).

    python benchmarks/quad_vs_clues.py
"""

from __future__ import annotations

import time
from pathlib import Path

from clues_fl.experiments.suite import _quad_comparison

SIZE = {"data.samples-per-client": 80, "data.max-length": 128, "trace.rounds": 3, "retrain.rounds": 2,
        "data.val-size": 48, "data.test-size": 48, "eval.max-samples": 0, "eval.mc-items": 0}


def main() -> None:
    out = Path("outputs/quad-demo-size")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    lines = _quad_comparison(SIZE, out, quick=True)  # quick: the FiQA pool only
    lines.append(f"Wall time {(time.time() - start) / 60:.1f} min.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
