"""Where a run's outputs go: <output-dir>/<run-name>."""

from __future__ import annotations

import os
from pathlib import Path

from clues_fl.config import RunConfig, check_run_name


def output_dir(cfg: RunConfig, create: bool = True) -> Path:
    """outputs/<run-name> (created unless `create` is false); a relative output-dir is taken
    from CLUES_FL_OUTPUT_ROOT when set (the launcher sets it to the repo: Flower runs the
    app from its own folder). The run-name is a plain name (check_run_name): the folder
    is always inside output-dir."""
    check_run_name(cfg.run.run_name)
    base = Path(cfg.run.output_dir).expanduser()
    if not base.is_absolute() and os.environ.get("CLUES_FL_OUTPUT_ROOT"):
        base = Path(os.environ["CLUES_FL_OUTPUT_ROOT"]) / base
    path = base / cfg.run.run_name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
