"""Selection F1 against the privacy budget, on the real scores of a finished run.

For each epsilon the sites' reports are made (epsilon, delta)-DP exactly as the
ClientApp does it (clipped scores + Gaussian noise, or noised histogram counts), the
server derives the threshold from the noisy reports and the exact public anchor
scores, and every site applies it to its exact scores. Prints a table and writes
privacy_curve.png next to the run.

    python benchmarks/privacy_curve.py outputs/<run-name> [--rule mixture] [--seeds 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clues_fl.experiments.suite import plot_privacy_curves, privacy_curves, privacy_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--rule", default="mixture")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    curves = privacy_curves(run_dir, args.rule, args.seeds, args.delta)
    print(privacy_table(curves))
    plot_privacy_curves(curves, run_dir / "privacy_curve.png", f"{run_dir.name}: {args.rule} threshold under DP")
    print(f"plot: {run_dir / 'privacy_curve.png'}")


if __name__ == "__main__":
    main()
