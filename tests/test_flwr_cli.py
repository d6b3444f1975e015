"""The smoke scenario through the real `flwr run` CLI (local simulation SuperLink,
real SmolLM2, real FiQA samples), and a failing run that must exit non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def launch(tmp_path: Path, extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    return subprocess.run(
        [sys.executable, "-m", "clues_fl.launch", "scenarios/smoke.toml", "--run-config", extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )


def stopped_pids_are_gone(stdout: str) -> bool:
    """The launcher prints the pids it started and stopped; none may still run."""
    line = next(l for l in stdout.splitlines() if l.startswith("stopped processes:"))
    pids = [int(p) for p in line.split(":", 1)[1].split()]
    return bool(pids) and not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_smoke_scenario_runs_through_flwr_cli(tmp_path):
    out = tmp_path / "outputs"
    proc = launch(tmp_path, f"output-dir='{out}' run-name='cli-smoke'")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run status: finished:completed" in proc.stdout
    metrics = json.loads((out / "cli-smoke" / "metrics.json").read_text())
    assert set(metrics["selection"]["per-client"]) == {"client-0", "client-1"}
    assert 0.0 <= metrics["selection"]["f1"] <= 1.0
    assert metrics["validation-loss"]["selected"] > 0
    assert (out / "cli-smoke" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "cli-smoke" / "report.md").exists() and (out / "cli-smoke" / "score_histograms.png").exists()
    assert stopped_pids_are_gone(proc.stdout)
    # the console: a line when each phase starts and ends, no per-phase Flower banner, no library warnings
    console = proc.stdout + proc.stderr
    for phase in ("trace", "score", "threshold", "select", "retrain", "evaluate"):
        assert f"{phase}: started" in console and f"{phase}: done in" in console, phase
    for noise in ("fraction_evaluate is set to 0.0", "(empty!)", "FutureWarning", "DeprecationWarning"):
        assert noise not in console, noise


def test_failed_run_exits_nonzero(tmp_path):
    proc = launch(tmp_path, f"output-dir='{tmp_path}' selection.threshold='not-a-rule'")
    assert proc.returncode != 0
    assert "completed" not in proc.stdout.split("run status:")[-1]
    assert stopped_pids_are_gone(proc.stdout)
