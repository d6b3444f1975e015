"""The processes one launch started, found and stopped together (Linux /proc).

Every process the launcher starts carries MARKER=<launch id> in its environment, and
so does everything those start (Flower's SuperExec and app processes, which Flower
detaches into sessions of their own, and Ray's workers): stopping the process groups
the launcher started does not reach them, their marker does.

A launcher can die without cleaning up (SIGKILL, a crash, a closed terminal). Two
things stop what it left:

- the watchdog, a small process the launcher starts in a session of its own (not
  marked, so no cleanup kills it first). It waits for the launcher to end, however it
  ends, then stops every marked process of that launch and exits;
- the reaper, run by every new launch: marked processes whose launcher (LAUNCHER in
  their environment: its pid and start time) is gone are stopped.

    python -m clues_fl.federation.processes watch <launcher pid> <launcher start time> <launch id>
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

MARKER = "CLUES_FL_LAUNCH_ID"  # in the environment of every process a launch starts
LAUNCHER = "CLUES_FL_LAUNCHER"  # "<pid>:<start time>" of the launcher that started it
REPO = Path(__file__).resolve().parents[2]


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None  # gone meanwhile, or not ours to read
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22):
    with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def alive(pid: int, started: str | None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def _pids() -> list[int]:
    me = os.getpid()
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if p.name.isdigit() and int(p.name) != me]


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment holds MARKER=marker (Linux; elsewhere none)."""
    return [pid for pid in _pids() if (env := _environ(pid)) is not None and env.get(MARKER) == marker]


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_marked(marker: str, grace: float = 5.0, timeout: float = 60.0) -> list[int]:
    """SIGTERM every process of the launch, SIGKILL what is left after `grace` seconds;
    again until none is left (a dying parent may start one more), at most `timeout` s.
    Returns every pid it signalled."""
    signalled: set[int] = set()
    deadline = time.time() + timeout
    while (pids := marked_processes(marker)) and time.time() < deadline:
        signalled.update(pids)
        _signal(pids, signal.SIGTERM)
        until = time.time() + grace
        while (left := marked_processes(marker)) and time.time() < until:
            time.sleep(0.2)
        _signal(left, signal.SIGKILL)
        time.sleep(0.2)
    return sorted(signalled)


def orphans() -> dict[str, list[int]]:
    """Launch id -> its marked processes, for launches whose launcher is gone."""
    found: dict[str, list[int]] = {}
    for pid in _pids():
        env = _environ(pid)
        if not env or MARKER not in env or LAUNCHER not in env:
            continue
        launcher, _, started = env[LAUNCHER].partition(":")
        if launcher.isdigit() and not alive(int(launcher), started or None):
            found.setdefault(env[MARKER], []).append(pid)
    return found


def reap_orphans() -> list[int]:
    """Stop what earlier launches left running after their launcher died."""
    stopped: list[int] = []
    for marker in orphans():
        stopped += stop_marked(marker, grace=3.0)
    return stopped


def launcher_env(marker: str) -> dict[str, str]:
    """The environment entries that mark a process as started by this launcher."""
    return {MARKER: marker, LAUNCHER: f"{os.getpid()}:{start_time(os.getpid())}"}


def _wait_for_exit(pid: int, started: str | None) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel or Python), or already gone
        while alive(pid, started):
            time.sleep(0.5)
        return
    try:
        if alive(pid, started):  # still the launcher, not a reused pid: wait on the pidfd
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll()
    finally:
        os.close(fd)


def watch(launcher_pid: int, started: str | None, marker: str) -> list[int]:
    """Block until the launcher has ended, then stop what its launch left running."""
    _wait_for_exit(launcher_pid, started)
    return stop_marked(marker, grace=3.0)


def start_watchdog(marker: str, log: Path) -> subprocess.Popen:
    """A watchdog for this process (the launcher) and its launch `marker`."""
    env = {k: v for k, v in os.environ.items() if k not in (MARKER, LAUNCHER)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "clues_fl.federation.processes", "watch", str(os.getpid()),
             str(start_time(os.getpid())), marker],
            env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "watch":
        print(__doc__, file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the launcher's to handle
    stopped = watch(int(argv[1]), None if argv[2] == "None" else argv[2], argv[3])
    if stopped:
        print(f"watchdog: launcher {argv[1]} ended; stopped {' '.join(map(str, stopped))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
