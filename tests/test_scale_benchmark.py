"""benchmarks/scale.py at its smallest: every step runs and is measured, the traffic is
that of the real typed messages, the prefix cache stays within its budget. (Its figures
are for docs/scale.md, not asserted here: these machines are shared.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from clues_fl.federation import messages as msg

REPO = Path(__file__).resolve().parent.parent


def test_the_scale_benchmark_measures_every_step_from_real_messages(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--sizes", "60",
                          "--cache-budget", "1GB", "--workdir", str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"time_exponent=\S+ rss_growth=1\.000 disk_gb_at_60=[0-9.]+ bytes_per_sample=[0-9.]+", last)
    (result,) = json.loads(out.read_text())
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale

    assert set(result["steps"]) == set(scale.ALL_STEPS)
    for name, step in result["steps"].items():
        assert step["seconds"] > 0 and step["peak_mib"] > result["baseline_mib"] * 0.5, name
    n = result["n"]
    # what a site sends for query.score: its n keyed-hash ids (32 hex digits) and scores
    reply = msg.ScoreReply(n, ids=["0" * 32] * n, scores=[0.0] * n, score_seconds=1.0).to_record()
    assert abs(result["steps"]["score"]["sent"] - msg.wire_bytes(reply)) < 16
    assert result["steps"]["trace"]["received"] > 0 and result["steps"]["retrain"]["sent"] > 0
    assert result["cached"] == n and 0 < result["disk"]["prefix-cache"] <= result["cache_budget"] == 10**9
    assert 0 < result["quad_scored"] <= n
