"""The watchdog and the reaper stop what a dead launcher left running (no Flower: a
stand-in launcher and `sleep` children; test_flwr_cli.py does it with the real one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from clues_fl.federation.processes import LAUNCHER, MARKER, marked_processes, orphans, reap_orphans, start_time

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_the_watchdog_stops_the_launch_when_the_launcher_is_killed(tmp_path):
    marker = uuid.uuid4().hex
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, time
        from pathlib import Path
        from clues_fl.federation.processes import launcher_env, start_watchdog
        env = dict(os.environ, **launcher_env({marker!r}))
        start_watchdog({marker!r}, Path({str(tmp_path / 'watchdog.log')!r}))
        for _ in range(3):  # children in sessions of their own, as Flower starts them
            subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
        print("ready", flush=True)
        time.sleep(300)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        assert wait_until(lambda: len(marked_processes(marker)) == 3, 10)
        launcher.kill()  # SIGKILL: no cleanup of its own
        launcher.wait()
        assert wait_until(lambda: not marked_processes(marker), 15), marked_processes(marker)
        assert wait_until(lambda: "watchdog: launcher" in (tmp_path / "watchdog.log").read_text(), 10)
    finally:
        for pid in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)


def test_the_reaper_stops_processes_whose_launcher_is_gone():
    gone = subprocess.Popen(["true"])
    gone.wait()  # a launcher pid that no longer runs
    marker, live_marker = uuid.uuid4().hex, uuid.uuid4().hex
    orphan = subprocess.Popen(["sleep", "300"], env=dict(os.environ, **{MARKER: marker, LAUNCHER: f"{gone.pid}:1"}))
    owned = subprocess.Popen(["sleep", "300"], env=dict(os.environ, **{
        MARKER: live_marker, LAUNCHER: f"{os.getpid()}:{start_time(os.getpid())}"}))
    try:
        assert wait_until(lambda: marker in orphans(), 5)
        assert live_marker not in orphans()  # its launcher (this process) still runs
        assert orphan.pid in reap_orphans()
        assert wait_until(lambda: orphan.poll() is not None, 10)
        assert owned.poll() is None
    finally:
        for proc in (orphan, owned):
            proc.kill()
            proc.wait()
