"""Sample ids leave a site only as keyed hashes (clues_fl/federation/site_ids.py)."""

from __future__ import annotations

import hashlib
import stat

from clues_fl.config import parse_config
from clues_fl.federation.site_ids import hash_ids, read_id_map, site_dir, site_key, wire_ids

IDS = ["patient-0001", "patient-0002", "acct-77"]


def cfg(tmp_path, name="r1"):
    return parse_config({"run-name": name, "output-dir": str(tmp_path)})


def test_hashes_are_stable_per_site_and_run_and_keyed(tmp_path):
    node = {"partition-id": 0, "num-partitions": 2}
    first = wire_ids(cfg(tmp_path), node, IDS)
    assert wire_ids(cfg(tmp_path), node, IDS) == first  # a resumed run: same salt on disk, same hashes
    assert all(len(h) == 32 and all(c in "0123456789abcdef" for c in h) for h in first)
    assert not set(first) & set(IDS)
    # no unkeyed hash of an id matches (the server cannot test a guessed id)
    plain = {hashlib.sha256(i.encode()).hexdigest()[:32] for i in IDS}
    assert not plain & set(first)
    # another site, another run, or another salt: other hashes
    assert set(wire_ids(cfg(tmp_path), {"partition-id": 1, "num-partitions": 2}, IDS)).isdisjoint(first)
    assert set(wire_ids(cfg(tmp_path, "r2"), node, IDS)).isdisjoint(first)
    other = tmp_path / "elsewhere"
    assert set(wire_ids(cfg(tmp_path), {**node, "site-dir": str(other)}, IDS)).isdisjoint(first)


def test_the_site_keeps_the_map_and_its_salt_private(tmp_path):
    node = {"partition-id": 3}
    folder = site_dir(cfg(tmp_path), node)
    assert folder == tmp_path / "r1" / "sites" / "client-3"
    hashed = wire_ids(cfg(tmp_path), node, IDS)
    assert read_id_map(folder) == dict(zip(hashed, IDS))
    assert stat.S_IMODE((folder / "id-salt").stat().st_mode) == 0o600
    assert hash_ids(IDS, site_key(cfg(tmp_path), node)) == hashed
