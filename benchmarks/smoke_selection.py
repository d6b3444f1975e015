"""What the smoke scenario drops, over seeds, and what it costs: scenarios/smoke.toml run
in-process on the real model (the real ClientApp and strategy over an in-memory grid,
evaluation off), per seed the kept count, the exchanged and clean answers dropped, and
the run's seconds; `--before` also runs the earlier smoke settings (CLUES with the
mixture rule over 4 anchors, cross-domain pollution) on the same seeds, side by side.

    python benchmarks/smoke_selection.py [--seeds 0,1,2,3] [--before]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
from pathlib import Path

from flwr.common.config import flatten_dict

from clues_fl.experiments.suite import Lab
from clues_fl.selection.rules import NothingKept

REPO = Path(__file__).resolve().parent.parent
QUIET = {"eval.validation": False, "eval.max-samples": 0, "eval.mc-items": 0}
BEFORE = {"data.anchor-size": 4, "pollution.types": "cross-domain", "selection.method": "clues",
          "selection.threshold": "mixture"}


def run(name: str, values: dict, out: Path) -> dict:
    start = time.time()
    try:
        outcome = Lab(values, out / name, fresh=True).run(name)
    except NothingKept:  # the run stops before aggregation: every sample dropped
        polluted = sum(round(float(r) * 8) for r in str(values["pollution.ratios"]).split(","))
        return {"kept": 0, "n": 16, "polluted": polluted, "polluted-dropped": polluted, "clean-dropped": 16 - polluted,
                "seconds": time.time() - start}
    kept, polluted = outcome.kept, outcome.polluted
    return {"kept": int(kept.sum()), "n": int(kept.size), "polluted": int(polluted.sum()),
            "polluted-dropped": int((~kept & polluted).sum()), "clean-dropped": int((~kept & ~polluted).sum()),
            "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--before", action="store_true", help="also the earlier smoke settings, side by side")
    args = parser.parse_args()
    smoke = flatten_dict(tomllib.loads((REPO / "scenarios" / "smoke.toml").read_text()))
    smoke.pop("run-name")
    settings = {"smoke": {**smoke, **QUIET}}
    if args.before:
        settings["before"] = {**smoke, **QUIET, **BEFORE}
    totals: dict[str, dict] = {}
    print("| settings | seed | kept | exchanged/polluted dropped | clean dropped | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, values in settings.items():
                r = run(f"{name}-{seed}", {**values, "seed": seed}, Path(tmp))
                t = totals.setdefault(name, {"polluted": 0, "polluted-dropped": 0, "clean": 0, "clean-dropped": 0,
                                             "seconds": 0.0})
                t["polluted"] += r["polluted"]
                t["polluted-dropped"] += r["polluted-dropped"]
                t["clean"] += r["n"] - r["polluted"]
                t["clean-dropped"] += r["clean-dropped"]
                t["seconds"] += r["seconds"]
                print(f"| {name} | {seed} | {r['kept']}/{r['n']} | {r['polluted-dropped']}/{r['polluted']} | "
                      f"{r['clean-dropped']}/{r['n'] - r['polluted']} | {r['seconds']:.0f} |", flush=True)
    for name, t in totals.items():
        print(f"{name}: dropped {t['polluted-dropped']} of {t['polluted']} polluted and {t['clean-dropped']} of "
              f"{t['clean']} clean answers in {t['seconds']:.0f} s")


if __name__ == "__main__":
    main()
