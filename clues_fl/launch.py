"""Run a scenario through the real `flwr run` CLI on a local simulation SuperLink.

`flwr run` against the built-in `local` connection starts a SuperLink in the
background and leaves it running, without telling its process id. This launcher
checks the run first (clues_fl.federation.preflight: run-config, model, every site's data, the
run's folder: its lock and saved state, clues_fl.federation.run_dir; a bad one exits 2 within
seconds, before anything starts), then starts the SuperLink
itself on a free port with a Flower home of its own, runs the app, asks the SuperLink
for the run's final status (`flwr run --stream` can exit 0 on a failed run), and
stops everything it started.

    python -m clues_fl.launch scenarios/smoke.toml [--run-config "k=v ..."]
    python -m clues_fl.launch scenarios/smoke.toml --deploy 3 [--data-dir sites/] [--tls]

Each launch has its own Flower home, $FLWR_HOME/launches/<time>-<run-name>-<id>/
($FLWR_HOME defaults to .flwr/ in the repo), with its own connection (config.toml),
run-config file and logs: the user's $FLWR_HOME/config.toml is never read or
written, and launches at the same time do not meet. The first line printed names it.

With --deploy it prints one "supernode I pid P log FILE" line per site as it starts
them (tests use it to stop a site mid-run). At the end, on SIGINT, SIGTERM or SIGHUP,
it stops every process it started, then any process they left behind (found by an
environment marker, clues_fl.federation.processes); if the launcher itself is killed, a watchdog
process does that. With --tls it makes a throw-away CA and a certificate for
127.0.0.1/localhost in the launch's Flower home (certificates/) and runs every
connection over TLS (docs/deployment.md).
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
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import tomllib

from clues_fl.config import ConfigError, parse_config, run_config_tokens
from clues_fl.federation.preflight import PreflightError, preflight, site_entries
from clues_fl.federation.run_dir import RunInUse, RunLock, finished, run_folder
from clues_fl.federation.processes import MARKER, launcher_env, marked_processes, reap_orphans, start_watchdog, stop_marked

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "clues-local"
__all__ = ["MARKER", "main", "make_tls_certificates", "marked_processes", "run"]


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP reached the launcher: stop the launch."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _scenario_nodes(values: dict, default: int = 2) -> int:
    """Sites of a simulation: one per pollution ratio, else fed.min-nodes, else `default`."""
    ratios = [r for r in str(values.get("pollution.ratios", "")).split(",") if r.strip()]
    if ratios:
        return len(ratios)
    try:
        return int(values.get("fed.min-nodes", default))
    except (TypeError, ValueError):
        return default  # preflight names the bad value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _run_values(scenario: Path | None, overrides: str | None) -> dict:
    """The scenario file's keys with the --run-config overrides over them (flat keys)."""
    from flwr.common.config import flatten_dict, parse_config_args

    try:
        values = flatten_dict(tomllib.loads(scenario.read_text())) if scenario else {}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise PreflightError(f"{scenario}: {' '.join(str(err).split())}") from err
    if overrides:
        try:
            run_config_tokens(overrides)  # Flower's parser drops what is not key=value
            values.update(parse_config_args([overrides]))
        except ConfigError as err:
            raise PreflightError(str(err)) from err
        except Exception as err:  # noqa: BLE001 - Flower raises several types for a bad string
            raise PreflightError(f"--run-config: {' '.join(str(err).split())}") from err
    return values


def _render_run_config(values: dict) -> str:
    """One TOML file: `flwr run` takes a file or key=value pairs, not both."""
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in values.items())


def _launch_home(values: dict, marker: str) -> Path:
    """This launch's own Flower home, under $FLWR_HOME/launches (default .flwr/ in the repo)."""
    base = Path(os.environ.get("FLWR_HOME") or REPO / ".flwr")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(values.get("run-name", "demo")))[:60]
    home = base / "launches" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{marker[:8]}"
    home.mkdir(parents=True)
    return home


def _wait_http(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StartFailed(f"flower-superlink exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise StartFailed("flower-superlink did not open its port in time")


def _run_status(env: dict, run_id: int | None) -> str:
    cmd = [_bin("flwr"), "ls", CONNECTION, "--format", "json"]
    if run_id is not None:
        cmd += ["--run-id", str(run_id)]
    out = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    try:
        payload = json.loads(out.stdout)
    except json.JSONDecodeError:
        return f"unknown ({out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"
    runs = payload.get("runs", [])
    if not runs:
        return "unknown (no run listed)"
    run = runs[-1] if run_id is None else next((r for r in runs if int(r.get("run-id", -1)) == run_id), runs[-1])
    return str(run.get("status", "unknown"))


class StartFailed(RuntimeError):
    """A process of the launch did not start: the launch stops with its one line."""


def _wait_supernodes(env: dict, sites: list[subprocess.Popen], timeout: float = 180.0,
                     logs: list[Path] | None = None) -> None:
    """Until the SuperLink lists every SuperNode online: a ServerApp that waits for
    fed.min-nodes < N sites would otherwise start with whichever came first."""
    deadline = time.time() + timeout
    online = 0
    while time.time() < deadline:
        for i, site in enumerate(sites):
            if site.poll() is not None:
                log = f" (its log: {logs[i]})" if logs else ""
                raise StartFailed(f"supernode {i} exited with code {site.returncode} while starting{log}")
        out = subprocess.run([_bin("flwr"), "supernode", "ls", CONNECTION, "--format", "json"], check=False,
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        try:
            online = sum(n.get("status") == "online" for n in json.loads(out.stdout).get("nodes", []))
        except json.JSONDecodeError:
            online = 0
        if online >= len(sites):
            return
        time.sleep(1.0)
    raise StartFailed(f"only {online} of {len(sites)} SuperNodes connected in {timeout:.0f} s")


def _stop(procs: list[subprocess.Popen], timeout: float) -> None:
    """Stop processes we started, and their children, by their process-group ids:
    SIGTERM to all, SIGKILL to those still running after `timeout` seconds."""
    def signal_groups(sig: int) -> None:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    signal_groups(signal.SIGTERM)
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    signal_groups(signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def make_tls_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                          days: int = 7) -> dict[str, Path]:
    """A self-signed CA and a server certificate it signs, valid for `hosts` (IP
    addresses or DNS names). For tests and loopback runs only: real sites use
    certificates from their organisation's CA (docs/deployment.md)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc) - timedelta(minutes=5)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_usage(**on) -> x509.KeyUsage:
        flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{f: on.get(f, False) for f in flags})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("clues-fl test CA")).issuer_name(name("clues-fl test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].touch(mode=0o600)
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def _stop_leftovers(marker: str, grace: float) -> list[int]:
    """Give the processes our processes started `grace` seconds to follow their parent
    out (they watch its pid), then stop the rest (processes.stop_marked)."""
    deadline = time.time() + grace
    while marked_processes(marker) and time.time() < deadline:
        time.sleep(0.5)
    return stop_marked(marker, grace=5.0, timeout=30.0)


def _site_files(data_dir: Path | None, sites: int) -> list[Path] | None:
    """A deployment's data, one entry per site (a data file or a `datasets` save_to_disk
    folder), sorted by name (None: no --data-dir)."""
    if data_dir is None:
        return None
    if not data_dir.is_dir():
        raise PreflightError(f"--data-dir {data_dir}: not a folder")
    files = site_entries(data_dir, f"--data-dir {data_dir}")
    if len(files) != sites:
        raise PreflightError(f"--data-dir {data_dir}: {len(files)} data files for {sites} sites")
    return files


def run(scenario: str | None, run_config: str | None, num_supernodes: int | None, cpus_per_client: int,
        deploy: int = 0, data_dir: Path | None = None, tls: bool = False, gpus_per_site: float = 0.0) -> int:
    """Simulation (default), or with `deploy=N` Flower's deployment engine: a SuperLink
    and N SuperNodes on 127.0.0.1, each site with its own node config (and data file).
    `tls`: every connection (SuperNodes, flwr CLI, apps) over TLS with a throw-away CA.
    Returns the exit code: 0 on a completed run (or one that had finished with this
    run-config: nothing to do), 2 when preflight refuses it (a run-name in use by another
    launch included: run_dir.RunLock, held until this returns), 128 + the signal number
    when stopped by a signal, else 1 (a process that did not start, a failed run)."""
    scenario_path = Path(scenario).resolve() if scenario else None
    root_given = "CLUES_FL_OUTPUT_ROOT" in os.environ
    os.environ.setdefault("CLUES_FL_OUTPUT_ROOT", str(REPO))  # where the apps write outputs/<run-name>
    marker = uuid.uuid4().hex
    lock = None
    try:  # before anything starts: a bad run-config, model or data file ends here, in seconds
        values = _run_values(scenario_path, run_config)
        lock = _claim_run(values, marker)
        nodes = deploy or num_supernodes or _scenario_nodes(values)
        site_files = _site_files(data_dir, deploy) if deploy else None
        cfg = preflight(values, sites=nodes, site_files=site_files)
        if done := finished(cfg):
            print(done, flush=True)
            return 0
        return _launch(values, nodes, site_files, marker, cpus_per_client=cpus_per_client, deploy=deploy, tls=tls,
                       gpus_per_site=gpus_per_site)
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if lock is not None:
            lock.release()
        if not root_given:
            os.environ.pop("CLUES_FL_OUTPUT_ROOT", None)


def _claim_run(values: dict, marker: str) -> RunLock | None:
    """The run folder's lock for this launch (run_dir.RunLock); PreflightError when the
    run-name is not a plain name or another running launch holds it. None when the
    run-config cannot name the folder yet (preflight then says why)."""
    try:
        cfg = parse_config(values)
    except ConfigError:
        return None
    try:
        return RunLock(run_folder(cfg), marker).claim()
    except (RunInUse, OSError) as err:
        raise PreflightError(str(err)) from err


def _launch(values: dict, nodes: int, site_files: list[Path] | None, marker: str, *, cpus_per_client: int,
            deploy: int, tls: bool, gpus_per_site: float) -> int:
    """Start the SuperLink (and SuperNodes), run the app, stop everything (see `run`)."""
    if reaped := reap_orphans():
        print(f"stopped processes left by an earlier launch: {' '.join(map(str, reaped))}", flush=True)

    home = _launch_home(values, marker)
    print(f"flower home {home}", flush=True)
    port = _free_port()
    if tls:
        certs = make_tls_certificates(home / "certificates")
        link_security = ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                         "--ssl-keyfile", str(certs["key"])]
        node_security = ["--root-certificates", str(certs["ca"])]
        cli_security = f"root-certificates = {json.dumps(str(certs['ca']))}\n"
    else:
        link_security, node_security, cli_security = ["--insecure"], ["--insecure"], "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{cli_security}'
    )
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1")
    env.update(launcher_env(marker))
    # The SuperLink starts flower-superexec and the apps by name: the venv must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_file = home / "superlink.log"
    started: list[subprocess.Popen] = []

    def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as fh:  # own session: stopping its group stops its children
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    start_watchdog(marker, home / "watchdog.log")  # stops the launch if this process dies without cleaning up
    stopped_by: Interrupted | None = None
    sites: list[subprocess.Popen] = []
    try:
        superlink = spawn(
            [_bin("flower-superlink"), *link_security, *([] if deploy else ["--simulation"]), "--isolation",
             "subprocess", "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:",
             "--disable-runtime-dependency-installation"],
            log_file,
        )
        print(f"superlink pid {superlink.pid} port {port} log {log_file}", flush=True)
        _wait_http(port, superlink)
        cmd = [_bin("flwr"), "run", ".", CONNECTION, "--stream"]
        if deploy:
            logs = []
            for i, data_file in enumerate(site_files or [None] * deploy):
                node_config = f"partition-id={i} num-partitions={deploy}"
                if data_file is not None:
                    node_config += f" data-file='{data_file.resolve()}'"
                log = home / f"supernode-{i}.log"
                logs.append(log)
                sites.append(spawn(
                    [_bin("flower-supernode"), *node_security, "--superlink", f"127.0.0.1:{port}",
                     "--isolation", "subprocess", "--port", str(_free_port()), "--node-config", node_config],
                    log,
                ))
                print(f"supernode {i} pid {sites[-1].pid} log {log}", flush=True)
            _wait_supernodes(env, sites, logs=logs)
        else:
            cmd += ["--federation-config", federation_config(nodes, cpus_per_client, gpus_per_site)]
        if values:
            path = home / "run-config.toml"
            path.write_text(_render_run_config(values))
            cmd += ["--run-config", str(path)]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env)
        status = _run_status(env, None)
        print(f"run status: {status}", flush=True)
        for i, site in enumerate(sites):
            if site.poll() is not None:
                print(f"supernode {i} had stopped during the run (exit code {site.returncode})", flush=True)
        ok = proc.returncode == 0 and "completed" in status
        if not ok:
            print(f"run failed (flwr exit {proc.returncode}, status '{status}'); logs in {home}", file=sys.stderr)
        return 0 if ok else 1
    except StartFailed as err:
        print(f"error: {err}; logs in {home}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as stop:
        stopped_by = stop
        print(f"{stop}: stopping every process this launch started", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for sig in handlers:  # cleanup runs to its end (bounded); a SIGKILL leaves it to the watchdog
            signal.signal(sig, signal.SIG_IGN)
        _stop(list(reversed(started)), timeout=5.0 if stopped_by else 20.0)
        print(f"stopped processes: {' '.join(str(p.pid) for p in started)}", flush=True)
        if left := _stop_leftovers(marker, grace=0.0 if stopped_by else 15.0):
            print(f"stopped leftover processes: {' '.join(map(str, left))}", flush=True)
        shutil.rmtree(home / "apps", ignore_errors=True)  # the installed app; the logs stay
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def federation_config(nodes: int, cpus_per_client: int, gpus_per_site: float = 0.0) -> str:
    """The simulation's `--federation-config`: sites and the resources each one reserves.
    A fractional GPU share (0.5: two sites per GPU) is a reservation, not a limit: the
    sites sharing a GPU must fit its memory together."""
    config = f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_client}"
    if gpus_per_site:
        config += f" client-resources-num-gpus={gpus_per_site:g}"
    return config


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: a whole number >= 1")
    return value


def _gpu_share(text: str) -> float:
    value = float(text)
    if value < 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text}: a share of one GPU in (0, 1] or a whole number of GPUs")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", help="a TOML run-config from scenarios/")
    parser.add_argument("--run-config", help="extra overrides, e.g. \"run-name='x' seed=1\"")
    parser.add_argument("--num-supernodes", type=_at_least_one, help="default: one per pollution ratio")
    parser.add_argument("--cpus-per-client", type=_at_least_one, default=os.cpu_count() or 1,
                        help="CPUs reserved per simulated site (default: all, so sites run one at a time)")
    parser.add_argument("--gpus-per-site", type=_gpu_share, default=0.0, metavar="F",
                        help="GPUs reserved per simulated site, fractional allowed (0.5: two sites share a GPU); "
                             "default 0 (CPU). Use with model.device auto or cuda")
    parser.add_argument("--deploy", type=_at_least_one, default=0, metavar="N",
                        help="run on Flower's deployment engine: a SuperLink and N SuperNodes on 127.0.0.1")
    parser.add_argument("--data-dir", type=Path, help="with --deploy: one data file per site (sorted by name)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep Flower's per-phase strategy banner and the libraries' deprecation warnings "
                             "(sets CLUES_FL_VERBOSE=1 for every process of the run)")
    parser.add_argument("--tls", action="store_true",
                        help="TLS on every connection, with a throw-away CA and server certificate for 127.0.0.1 "
                             "written to the launch's Flower home (loopback testing only)")
    args = parser.parse_args(argv)
    if args.verbose:  # inherited by the SuperLink, the apps and Ray's workers (clues_fl/console.py)
        os.environ["CLUES_FL_VERBOSE"] = "1"
    return run(args.scenario, args.run_config, args.num_supernodes, args.cpus_per_client, deploy=args.deploy,
               data_dir=args.data_dir, tls=args.tls, gpus_per_site=args.gpus_per_site)


if __name__ == "__main__":
    sys.exit(main())
