"""Turn a run-config into data: anchor, validation and test sets and client pools.

Every party derives its part from the same config and seed, so in simulation a
client only materialises its own partition, the server only the anchor and the
clean evaluation sets. In a deployment a site names its own file in its node
config (`data-file`) and nothing is partitioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clues_fl.config import ConfigError, DataSection, RunConfig
from clues_fl.data.sources import LoadResult, Sample, disk_dataset_kind, load_samples, per_site_sources
from clues_fl.data.pollution import parse_ratios, pollute
from clues_fl.data.splits import parse_sizes, partition, split_pool

@dataclass
class ScenarioData:
    anchor: list[Sample]
    val: list[Sample]
    test: list[Sample]
    clients: list[list[Sample]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # rows of the shared files (pool, anchor, eval)
    client_skipped: list[list[tuple[str, str]]] = field(default_factory=list)  # per site: rows of its own file


def _load(data: DataSection, source: str, domain: str = "", split: str = "train") -> LoadResult:
    """`source` read as the `data` section says (field names, what to do with bad rows)."""
    return load_samples(
        source,
        question_field=data.question_field or None,
        answer_field=data.answer_field or None,
        on_error=data.on_error,
        domain=domain,
        split=split,
    )


def _domain_of(source: str) -> str:
    name = source.split(":", 1)[-1]
    if disk_dataset_kind(Path(name).expanduser()):  # a save_to_disk folder: its own name
        return Path(name).name
    return Path(name).parent.name or Path(name).stem


def _anchor_eval(cfg: RunConfig, pool: list[Sample], skipped: list) -> tuple[list, list, list, list]:
    """Anchor, validation, test sets (from their files or split off the pool) and the rest."""
    seed = cfg.run.seed

    def from_file(key: str) -> list[Sample] | None:
        if not cfg[key]:
            return None
        res = _load(cfg.data, cfg[key], domain=_domain_of(cfg[key]))
        skipped.extend(res.skipped)
        return res.samples

    anchor, evaluation = from_file("data.anchor-file"), from_file("data.eval-file")
    need_anchor = 0 if anchor is not None else cfg.data.anchor_size
    need_val = 0 if evaluation is not None else cfg.data.val_size
    need_test = 0 if evaluation is not None else cfg.data.test_size
    if need_anchor or need_val or need_test:
        if not pool:
            raise ConfigError(
                "data.pool is a folder of client files: give data.anchor-file and data.eval-file too"
            )
        splits = split_pool(pool, anchor_size=need_anchor, val_size=need_val, test_size=need_test, seed=seed)
        anchor = anchor if anchor is not None else splits.anchor
        val, test = (evaluation, evaluation) if evaluation is not None else (splits.val, splits.test)
        rest = splits.pool
    else:
        val = test = evaluation or []
        rest = pool
    if len(anchor) < 2:
        raise ConfigError(f"the anchor set needs at least 2 samples, got {len(anchor)}")
    return anchor, val, test, rest


@dataclass
class _Pool:
    shared: list[Sample]  # one pool, partitioned ([] when the pool is given per site)
    sites: list[list[Sample]] | None  # the pool per site (a folder or a DatasetDict), else None
    skipped: list[tuple[str, str]]  # the shared pool's skipped rows
    site_skipped: list[list[tuple[str, str]]]  # each site's own skipped rows


def _pool(cfg: RunConfig) -> _Pool:
    """The shared pool, or the pools per site when data.pool is given per site (a folder
    or a saved DatasetDict, data.sources.per_site_sources), with their skipped rows."""
    pool_source = cfg.data.pool or cfg.data.source
    per_site = per_site_sources(pool_source) if cfg.data.pool else None
    if per_site is not None:
        if not per_site:
            raise ConfigError(f"data.pool: folder '{pool_source}' holds no .json/.jsonl/.ndjson/.csv/.parquet "
                              "files (or `datasets` save_to_disk folders)")
        by_split = disk_dataset_kind(Path(pool_source).expanduser()) == "dict"  # a site's domain: its split or file
        loaded = [_load(cfg.data, source, domain=split if by_split else Path(source).stem, split=split)
                  for source, split in per_site]
        return _Pool([], [r.samples for r in loaded], [], [list(r.skipped) for r in loaded])
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    # data.source may list several sources (comma-separated): one domain each.
    for source in [pool_source] if cfg.data.pool else cfg.data.list("source"):
        res = _load(cfg.data, source, domain=_domain_of(source))
        skipped += res.skipped
        samples += res.samples
    return _Pool(samples, None, skipped, [])


def _server_reads_pool(cfg: RunConfig) -> bool:
    """Whether the server reads the pool: to split the anchor or evaluation set off it."""
    return not (cfg.data.anchor_file and cfg.data.eval_file)


def server_sets(cfg: RunConfig) -> tuple[list[Sample], list[Sample], list[Sample], list[tuple[str, str]]]:
    """Anchor, validation and test sets: what the server holds, and the rows skipped in
    the files it read (a shared pool's too: it is read to split the sets off)."""
    skipped: list[tuple[str, str]] = []
    shared: list[Sample] = []
    if _server_reads_pool(cfg):
        pool = _pool(cfg)
        shared, skipped = pool.shared, list(pool.skipped)
    anchor, val, test, _ = _anchor_eval(cfg, shared, skipped)
    return anchor, val, test, skipped


def build_scenario(cfg: RunConfig, num_clients: int) -> ScenarioData:
    """Deterministic split of the configured data into anchor/val/test/clients."""
    seed = cfg.run.seed
    pool = _pool(cfg)
    skipped = list(pool.skipped)
    if pool.sites is not None and len(pool.sites) != num_clients:
        raise ConfigError(
            f"data.pool: '{cfg['data.pool']}' has {len(pool.sites)} client files (or splits) but the "
            f"federation has {num_clients} clients"
        )
    anchor, val, test, rest = _anchor_eval(cfg, pool.shared, skipped)
    if pool.sites is not None:
        clients = pool.sites
        client_skipped = pool.site_skipped
    else:
        method = cfg.partition.method
        sizes = parse_sizes(cfg.partition.sizes) if method == "sizes" else None
        per_client = cfg.data.samples_per_client
        if per_client and method in ("iid", "domain"):
            sizes = [per_client] * num_clients
            method = "sizes" if method == "iid" else method
        clients = partition(rest, num_clients, sizes=sizes, seed=seed, method=method)
        # A shared pool's skipped rows belong to no site: counted once, by the server where it
        # reads the pool, else by the first site.
        client_skipped = [[] for _ in clients]
        if not _server_reads_pool(cfg) and client_skipped:
            client_skipped[0] = list(pool.skipped)

    ratios = parse_ratios(cfg.pollution.ratios) if cfg.pollution.ratios else []
    if ratios:
        if len(ratios) != num_clients:
            raise ConfigError(f"pollution.ratios: {len(ratios)} values for {num_clients} clients")
        kinds = cfg.pollution.list("types")
        donors: list[Sample] = []
        if "cross-domain" in kinds:
            for source in cfg.pollution.list("donors"):
                donors += _load(cfg.data, source, domain=_domain_of(source)).samples
        clients = [
            pollute(samples, ratio, kinds, donors=donors, seed=seed + 1000 * (i + 1))
            for i, (samples, ratio) in enumerate(zip(clients, ratios))
        ]
    return ScenarioData(anchor, val, test, clients, skipped, client_skipped)


def site_samples(cfg: RunConfig, node_config: dict) -> tuple[list[Sample], list[tuple[str, str]]]:
    """This site's training pool: its own file in a deployment, else its partition; and
    the rows it skipped in its own file (a shared pool's are the server's to count)."""
    if node_config.get("data-file"):
        res = _load(cfg.data, str(node_config["data-file"]), domain=str(node_config.get("domain", "")))
        return res.samples, res.skipped
    pid = int(node_config.get("partition-id", 0))
    count = int(node_config.get("num-partitions", 1))
    data = build_scenario(cfg, count)
    return data.clients[pid], data.client_skipped[pid]
