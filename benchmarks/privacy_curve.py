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

from clues_fl.privacy import selection_f1_under_noise
from clues_fl.report import read_run

EPSILONS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def curves(run_dir: Path, rule: str, seeds: int, delta: float) -> dict[str, list[dict]]:
    metrics, anchors, scores, polluted, _, sites = read_run(run_dir)
    if metrics["threshold"].get("standardised"):
        raise SystemExit("merging-mode runs standardise per site; privacy modes need mode='federated'")
    return {
        report: selection_f1_under_noise(scores, polluted, anchors, EPSILONS, delta, rule, range(seeds),
                                         report=report, site_ids=sites)
        for report in ("scores", "histogram")
    }


def plot(result: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for report, rows in result.items():
        eps = [r["epsilon"] for r in rows]
        mean = [r["f1_mean"] for r in rows]
        std = [r["f1_std"] for r in rows]
        ax.errorbar(eps, mean, yerr=std, marker="o", capsize=3, label=f"noised {report}")
    ax.axhline(result["scores"][0]["f1_raw"], color="k", ls="--", lw=1, label="no privacy")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon per sample and run (delta 1e-5)")
    ax.set_ylabel("selection F1")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, list[dict]]) -> str:
    lines = ["| epsilon | sigma (scores) | F1 noised scores | F1 noised histogram |", "| --- | --- | --- | --- |"]
    for s_row, h_row in zip(result["scores"], result["histogram"]):
        lines.append(f"| {s_row['epsilon']:g} | {s_row['sigma']:.3g} | {s_row['f1_mean']:.3f} ± {s_row['f1_std']:.3f}"
                     f" | {h_row['f1_mean']:.3f} ± {h_row['f1_std']:.3f} |")
    lines.append(f"| no privacy | 0 | {result['scores'][0]['f1_raw']:.3f} | "
                 f"{result['histogram'][0]['f1_noiseless']:.3f} (binned, no noise) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--rule", default="mixture")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    result = curves(run_dir, args.rule, args.seeds, args.delta)
    print(table(result))
    plot(result, run_dir / "privacy_curve.png", f"{run_dir.name}: {args.rule} threshold under DP")
    print(f"plot: {run_dir / 'privacy_curve.png'}")


if __name__ == "__main__":
    main()
