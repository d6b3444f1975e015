"""Run a scenario through the real `flwr run` CLI on a local simulation SuperLink.

`flwr run` against the built-in `local` connection starts a SuperLink in the
background and leaves it running, without telling its process id. This launcher
starts the SuperLink itself (free port, FLWR_HOME inside the repo), runs the app,
asks the SuperLink for the run's final status (`flwr run --stream` can exit 0 on
a failed run), and always stops the SuperLink by its process id.

    python -m clues_fl.launch scenarios/smoke.toml [--run-config "k=v ..."]
    python -m clues_fl.launch scenarios/smoke.toml --deploy 3 [--data-dir sites/]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "clues-local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _scenario_nodes(scenario: Path | None, default: int) -> int:
    if scenario is None:
        return default
    data = tomllib.loads(scenario.read_text())
    ratios = str(data.get("pollution", {}).get("ratios", ""))
    if "fed" in data and "min-nodes" in data["fed"] and not ratios:
        return int(data["fed"]["min-nodes"])
    return len([r for r in ratios.split(",") if r.strip()]) or default


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _merged_run_config(scenario: Path | None, overrides: str | None) -> str:
    """One TOML file: `flwr run` takes a file or key=value pairs, not both."""
    from flwr.common.config import flatten_dict, parse_config_args

    values = flatten_dict(tomllib.loads(scenario.read_text())) if scenario else {}
    if overrides:
        values.update(parse_config_args([overrides]))
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in values.items())


def _wait_http(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("flower-superlink did not open its port in time")


def _run_status(env: dict, run_id: int | None) -> str:
    cmd = [_bin("flwr"), "ls", CONNECTION, "--format", "json"]
    if run_id is not None:
        cmd += ["--run-id", str(run_id)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    try:
        payload = json.loads(out.stdout)
    except json.JSONDecodeError:
        return f"unknown ({out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"
    runs = payload.get("runs", [])
    if not runs:
        return "unknown (no run listed)"
    run = runs[-1] if run_id is None else next((r for r in runs if int(r.get("run-id", -1)) == run_id), runs[-1])
    return str(run.get("status", "unknown"))


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its children, by its process-group id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _site_files(data_dir: Path | None, sites: int) -> list[Path | None]:
    if data_dir is None:
        return [None] * sites
    files = sorted(p for p in data_dir.iterdir() if p.suffix in (".json", ".jsonl", ".csv", ".parquet"))
    if len(files) != sites:
        raise SystemExit(f"--data-dir {data_dir}: {len(files)} data files for {sites} sites")
    return files


def run(scenario: str | None, run_config: str | None, num_supernodes: int | None, cpus_per_client: int,
        deploy: int = 0, data_dir: Path | None = None) -> int:
    """Simulation (default), or with `deploy=N` Flower's deployment engine: a SuperLink
    and N SuperNodes on 127.0.0.1, each site with its own node config (and data file)."""
    home = Path(os.environ.get("FLWR_HOME", REPO / ".flwr"))
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1")
    env.setdefault("CLUES_FL_OUTPUT_ROOT", str(REPO))
    # The SuperLink starts flower-superexec and the apps by name: the venv must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_file = home / "superlink.log"
    started: list[subprocess.Popen] = []

    def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as fh:  # own session: stopping its group stops its children
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    superlink = spawn(
        [_bin("flower-superlink"), "--insecure", *([] if deploy else ["--simulation"]), "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:",
         "--disable-runtime-dependency-installation"],
        log_file,
    )
    try:
        _wait_http(port, superlink)
        scenario_path = Path(scenario).resolve() if scenario else None
        nodes = deploy or num_supernodes or _scenario_nodes(scenario_path, 2)
        cmd = [_bin("flwr"), "run", ".", CONNECTION, "--stream"]
        if deploy:
            for i, data_file in enumerate(_site_files(data_dir, deploy)):
                node_config = f"partition-id={i} num-partitions={deploy}"
                if data_file is not None:
                    node_config += f" data-file='{data_file.resolve()}'"
                spawn([_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                       "--isolation", "subprocess", "--port", str(_free_port()), "--node-config", node_config],
                      home / f"supernode-{i}.log")
        else:
            cmd += ["--federation-config", f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_client}"]
        merged = _merged_run_config(scenario_path, run_config)
        if merged:
            path = home / "run-config.toml"
            path.write_text(merged)
            cmd += ["--run-config", str(path)]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        status = _run_status(env, None)
        print(f"run status: {status}", flush=True)
        ok = proc.returncode == 0 and "completed" in status
        if not ok:
            print(f"run failed (flwr exit {proc.returncode}, status '{status}'); logs in {home}", file=sys.stderr)
        return 0 if ok else 1
    finally:
        for proc in reversed(started):
            _stop(proc)
        print(f"stopped processes: {' '.join(str(p.pid) for p in started)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", help="a TOML run-config from scenarios/")
    parser.add_argument("--run-config", help="extra overrides, e.g. \"run-name='x' seed=1\"")
    parser.add_argument("--num-supernodes", type=int, help="default: one per pollution ratio")
    parser.add_argument("--cpus-per-client", type=int, default=os.cpu_count() or 1,
                        help="CPUs reserved per simulated site (default: all, so sites run one at a time)")
    parser.add_argument("--deploy", type=int, default=0, metavar="N",
                        help="run on Flower's deployment engine: a SuperLink and N SuperNodes on 127.0.0.1")
    parser.add_argument("--data-dir", type=Path, help="with --deploy: one data file per site (sorted by name)")
    args = parser.parse_args(argv)
    return run(args.scenario, args.run_config, args.num_supernodes, args.cpus_per_client, args.deploy, args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
