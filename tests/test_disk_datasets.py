"""`datasets` save_to_disk folders as data sources: a Dataset, a DatasetDict (one split per
site for data.pool, its 'train' split elsewhere), or a data.pool folder of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from clues_fl.config import ConfigError, parse_config
from clues_fl.data.sources import DataError, load_samples
from clues_fl.data.scenario import build_scenario, server_sets, site_samples


def rows(prefix: str, n: int, ids: bool = True) -> dict:
    out = {"question": [f"{prefix} question {i}?" for i in range(n)], "answer": [f"{prefix} answer {i}." for i in range(n)]}
    if ids:
        out["id"] = [f"{prefix}-{i}" for i in range(n)]
    return out


def write_jsonl(path, prefix: str, n: int):
    data = rows(prefix, n)
    path.write_text("".join(json.dumps({k: data[k][i] for k in data}) + "\n" for i in range(n)))
    return str(path)


def cfg(tmp_path, **values):
    return parse_config({"data.anchor-file": write_jsonl(tmp_path / "anchor.jsonl", "anchor", 4),
                         "data.eval-file": write_jsonl(tmp_path / "eval.jsonl", "eval", 5), **values})


def test_a_saved_dataset_or_datasetdict_loads_like_a_file(tmp_path):
    Dataset.from_dict(rows("plain", 3, ids=False)).save_to_disk(tmp_path / "plain")
    res = load_samples(str(tmp_path / "plain"))
    assert [s.id for s in res.samples] == ["plain-1", "plain-2", "plain-3"]
    assert res.samples[0].question == "plain question 0?"

    DatasetDict({"train": Dataset.from_dict(rows("t", 2)), "test": Dataset.from_dict(rows("x", 1))}).save_to_disk(
        tmp_path / "dd")
    assert [s.id for s in load_samples(str(tmp_path / "dd")).samples] == ["t-0", "t-1"]  # its 'train' split
    assert [s.id for s in load_samples(str(tmp_path / "dd"), split="test").samples] == ["x-0"]
    DatasetDict({"a": Dataset.from_dict(rows("a", 1))}).save_to_disk(tmp_path / "no-train")
    with pytest.raises(DataError, match="no 'train' split [(]splits: a[)]"):
        load_samples(str(tmp_path / "no-train"))
    bad = Dataset.from_dict({"question": ["q"], "answer": [None]})
    bad.save_to_disk(tmp_path / "bad")
    with pytest.raises(DataError, match=r"bad row 1: field 'answer' is null"):
        load_samples(str(tmp_path / "bad"))


def test_data_pool_as_a_datasetdict_gives_one_split_per_site(tmp_path):
    DatasetDict({"site-b": Dataset.from_dict(rows("b", 3)), "site-a": Dataset.from_dict(rows("a", 2))}).save_to_disk(
        tmp_path / "pool")
    c = cfg(tmp_path, **{"data.pool": str(tmp_path / "pool")})
    data = build_scenario(c, 2)
    assert [[s.id for s in site] for site in data.clients] == [["a-0", "a-1"], ["b-0", "b-1", "b-2"]]  # by name
    assert len(data.anchor) == 4 and len(data.val) == 5
    assert [s.id for s in site_samples(c, {"partition-id": 1, "num-partitions": 2})[0]] == ["b-0", "b-1", "b-2"]
    with pytest.raises(ConfigError, match="2 client files [(]or splits[)] but the federation has 3"):
        build_scenario(c, 3)


def test_data_pool_folder_of_saved_datasets_and_a_single_saved_pool(tmp_path):
    (tmp_path / "sites").mkdir()
    Dataset.from_dict(rows("s0", 2)).save_to_disk(tmp_path / "sites" / "0-hospital")
    write_jsonl(tmp_path / "sites" / "1-clinic.jsonl", "s1", 3)  # files and folders mix
    data = build_scenario(cfg(tmp_path, **{"data.pool": str(tmp_path / "sites")}), 2)
    assert [len(site) for site in data.clients] == [2, 3]

    Dataset.from_dict(rows("p", 30)).save_to_disk(tmp_path / "shared")
    shared = parse_config({"data.pool": str(tmp_path / "shared"), "data.anchor-size": 4, "data.val-size": 4,
                           "data.test-size": 2})
    data = build_scenario(shared, 2)  # one pool: anchors and evaluation split off, the rest partitioned
    assert len(data.anchor) == 4 and sum(len(s) for s in data.clients) == 30 - 4 - 4 - 2


def test_a_pool_folder_needs_anchor_and_eval_files(tmp_path):
    DatasetDict({"a": Dataset.from_dict(rows("a", 2)), "b": Dataset.from_dict(rows("b", 2))}).save_to_disk(
        tmp_path / "pool")
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "a.jsonl", "a", 2)
    for pool in ("pool", "files"):
        c = parse_config({"data.pool": str(tmp_path / pool)})
        with pytest.raises(ConfigError, match="give data.anchor-file and data.eval-file too"):
            server_sets(c)
        with pytest.raises(ConfigError, match="give data.anchor-file and data.eval-file too"):
            server_sets(parse_config({"data.pool": str(tmp_path / pool),
                                      "data.anchor-file": write_jsonl(tmp_path / "anchor.jsonl", "anchor", 4)}))


def test_the_launchers_check_counts_saved_datasets_in_a_pool_folder_as_sites(tmp_path):
    """preflight reads a data.pool folder by the sites' rule: save_to_disk folders (no file
    suffix) count beside files, a plain sub-folder is refused (it refused the saved datasets)."""
    from clues_fl.federation.preflight import PreflightError, pool_sites

    (tmp_path / "sites").mkdir()
    Dataset.from_dict(rows("s0", 2)).save_to_disk(tmp_path / "sites" / "0-hospital")
    write_jsonl(tmp_path / "sites" / "1-clinic.jsonl", "s1", 3)
    c = cfg(tmp_path, **{"data.pool": str(tmp_path / "sites")})
    assert [Path(source).name for source, _ in pool_sites(c)] == ["0-hospital", "1-clinic.jsonl"]
    assert [len(site) for site in build_scenario(c, 2).clients] == [2, 3]
    (tmp_path / "sites" / "2-empty.jsonl").mkdir()
    with pytest.raises(PreflightError, match="data.pool: '.*2-empty.jsonl' is a directory, not a data file"):
        pool_sites(c)
