"""What travels between server and sites, as Flower records.

Only adapter tensors (and their Adam moments while tracing), anchor gradients,
per-sample scores with keyed hashes of their ids (site_ids.py), and aggregate counts
ever leave a site.
A round's Adam moments travel in their own ArrayRecord (MOMENTS_KEY) under `adam.m/`
and `adam.v/` prefixes, averaged by strategies/site_rounds.py, not by the strategy; saved
checkpoints join them with the adapter in one record.

Every exchange is a dataclass below (TrainRequest/TrainReply, LocalTrainRequest/Reply,
ScoreRequest/Reply, SelectRequest/Reply, IdentifyRequest/Reply, DescribeRequest/
SiteDescription) with `to_record()` and `from_record()`, and every good reply carries
a `SiteCost` record (SITE_COST) besides: the wire's record names and keys are written here only; the ClientApp's handlers and the server's phases build and
parse messages through them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clues_fl.model.training import AdamMoments, Checkpoint

M_PREFIX, V_PREFIX = "adam.m/", "adam.v/"
MOMENTS_KEY = "adam"  # the record of a round's Adam moments, next to "arrays"


def state_record(state: dict[str, torch.Tensor], moments: AdamMoments | None = None) -> ArrayRecord:
    tensors = {k: v.detach().float() for k, v in state.items()}
    if moments is not None:
        tensors.update({M_PREFIX + k: v.detach().float() for k, v in moments.m.items()})
        tensors.update({V_PREFIX + k: v.detach().float() for k, v in moments.v.items()})
    return ArrayRecord(torch_state_dict=tensors)


def split_record(record: ArrayRecord) -> tuple[dict[str, torch.Tensor], AdamMoments | None]:
    tensors = record.to_torch_state_dict()
    state = {k: v for k, v in tensors.items() if not k.startswith((M_PREFIX, V_PREFIX))}
    m = {k[len(M_PREFIX):]: v for k, v in tensors.items() if k.startswith(M_PREFIX)}
    # clamp: DP noise on the aggregate (privacy.adapter-noise) can push a second moment below 0
    v = {k[len(V_PREFIX):]: t.clamp(min=0) for k, t in tensors.items() if k.startswith(V_PREFIX)}
    return state, (AdamMoments(m, v) if m else None)


def moments_record(moments: AdamMoments) -> ArrayRecord:
    """Adam moments as their own record (no adapter tensors)."""
    tensors = {M_PREFIX + k: v.detach().float() for k, v in moments.m.items()}
    tensors.update({V_PREFIX + k: v.detach().float() for k, v in moments.v.items()})
    return ArrayRecord(torch_state_dict=tensors)


def record_moments(record: ArrayRecord | None) -> AdamMoments | None:
    if record is None:
        return None
    return split_record(record)[1]


def average_moments(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """The weighted mean of the sites' moment records, computed as Flower's FedAvg
    averages arrays (float32 numpy, weights normalised to sum 1, sites in reply order),
    so that the numbers equal those of the moments riding in the adapter's record."""
    total = float(sum(weights))
    if not records or total <= 0:
        raise ValueError(f"average_moments: {len(records)} records with total weight {total}")
    out: dict = {}
    for record, weight in zip(records, weights, strict=True):
        factor = weight / total
        for key, value in record.items():
            if key not in out:
                out[key] = value.numpy() * factor
            else:
                out[key] += value.numpy() * factor
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})


def split_moments(record: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord | None]:
    """A joined record as (the adapter's record, the moments' record or None)."""
    moment_keys = [k for k in record.keys() if k.startswith((M_PREFIX, V_PREFIX))]
    if not moment_keys:
        return record, None
    return (ArrayRecord({k: record[k] for k in record.keys() if k not in moment_keys}),
            ArrayRecord({k: record[k] for k in moment_keys}))


def join_records(arrays: ArrayRecord, moments: ArrayRecord | None) -> ArrayRecord:
    """The adapter and its moments in one record (checkpoints, saved rounds)."""
    if moments is None:
        return arrays
    joined = {k: arrays[k] for k in arrays.keys()}
    joined.update({k: moments[k] for k in moments.keys()})
    return ArrayRecord({k: Array(v.numpy()) for k, v in joined.items()})


def checkpoint_record(ckpt: Checkpoint) -> ArrayRecord:
    return state_record(ckpt.state, ckpt.adam)


def record_checkpoint(record: ArrayRecord, lr: float) -> Checkpoint:
    state, moments = split_record(record)
    return Checkpoint(state, lr, moments)


def gradient_record(grads: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().float() for k, v in grads.items()})


def record_gradient(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def wire_bytes(content: RecordDict) -> int:
    """Bytes a message's content takes on the wire: the serialised objects Flower sends
    for it (its records, each array in chunks; an object repeated inside it travels
    once), without the message's envelope (its metadata, about 0.2 kB)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def ids_digest(ids) -> str:
    """A short digest of a site's sample ids, in order: how a resumed run recognises a
    site whose node got a new id (the server already holds the ids from scoring)."""
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()[:32]


# -- the protocol's messages ---------------------------------------------------------
# One dataclass per exchange, each with to_record() and from_record(): the only place the
# wire's record names and keys are spelt out. Flower's own strategies build the train
# message (configure_train: "arrays" + "config" with "server-round", and FedProx's
# "proximal-mu"); TrainRequest is the sites' typed view of it, in Flower's layout.

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # Flower's record names
SITE, SCORES, HISTOGRAM, SCORER, PRIVACY = "site", "scores", "histogram", "scorer", "privacy"
NUM_EXAMPLES = "num-examples"  # the metric Flower's strategies weight by
GPU_PEAK_KEY = "gpu-peak-mib"  # a site's peak GPU memory in the phase it answers (CUDA only)
PARTITION_ID = "partition-id"
SITE_COST = "site-cost"  # the record a site adds to every reply (SiteCost); the server takes it off


def _ckpt_key(k: int) -> str:
    return f"ckpt-{k}"


def _grad_key(k: int) -> str:
    return f"grad-{k}"


def _gpu(metrics: dict, peak: float | None) -> dict:
    return metrics if peak is None else {**metrics, GPU_PEAK_KEY: float(peak)}


def _peak(metrics) -> float | None:
    return float(metrics[GPU_PEAK_KEY]) if GPU_PEAK_KEY in metrics else None


def train_config(phase: str) -> ConfigRecord:
    """The config a server's strategy sends with every round of `phase` (Flower adds
    "server-round", FedProx "proximal-mu")."""
    return ConfigRecord({"phase": phase})


def train_phase(config) -> str:
    """The phase of a train message's config (trace, aggregate, all-data)."""
    return str(config.get("phase", "trace"))


def train_round(config) -> int:
    """The (true) server round of a train message's config."""
    return int(config.get("server-round", 1))


@dataclass
class TrainRequest:
    """One round of fed.strategy, as Flower's strategy sends it (message type "train"):
    the global adapter ("arrays"), "config" with the phase, the server round and
    FedProx's proximal-mu, and while tracing the global Adam moments (MOMENTS_KEY)."""

    message_type: ClassVar[str] = "train"
    state: dict[str, torch.Tensor]
    phase: str = "trace"
    server_round: int = 1
    proximal_mu: float = 0.0
    moments: AdamMoments | None = None

    def to_record(self) -> RecordDict:
        config = train_config(self.phase)
        config["server-round"] = int(self.server_round)
        config["proximal-mu"] = float(self.proximal_mu)
        content = RecordDict({ARRAYS: state_record(self.state), CONFIG: config})
        if self.moments is not None:
            content[MOMENTS_KEY] = moments_record(self.moments)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainRequest:
        config = content[CONFIG]
        state, moments = split_record(content[ARRAYS])  # moments riding in the adapter's record
        if MOMENTS_KEY in content:
            moments = record_moments(content[MOMENTS_KEY])
        return cls(state, train_phase(config), train_round(config), float(config.get("proximal-mu", 0.0)), moments)


@dataclass
class TrainReply:
    """A site's round: its adapter, its Adam moments (tracing) and the metrics Flower's
    strategy aggregates (num-examples weights the average)."""

    state: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    train_steps: int = 0
    train_seconds: float = 0.0
    moments: AdamMoments | None = None
    gpu_peak_mib: float | None = None

    def to_record(self) -> RecordDict:
        content = RecordDict({ARRAYS: state_record(self.state)})
        if self.moments is not None:
            content[MOMENTS_KEY] = moments_record(self.moments)
        content[METRICS] = MetricRecord(_gpu({
            NUM_EXAMPLES: int(self.num_examples),
            "train-loss": float(self.train_loss),
            "train-steps": int(self.train_steps),
            "train-seconds": float(self.train_seconds),
        }, self.gpu_peak_mib))
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainReply:
        state, moments = split_record(content[ARRAYS])
        if MOMENTS_KEY in content:
            moments = record_moments(content[MOMENTS_KEY])
        m = content[METRICS]
        return cls(state, int(m[NUM_EXAMPLES]), float(m["train-loss"]), int(m.get("train-steps", 0)),
                   float(m.get("train-seconds", 0.0)), moments, _peak(m))


@dataclass
class LocalTrainRequest:
    """Merging mode: a whole local run of `phase` (trace: with K checkpoints; retrain:
    on the kept samples)."""

    message_type: ClassVar[str] = "train.local"
    phase: str

    def to_record(self) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord({"phase": self.phase})})

    @classmethod
    def from_record(cls, content: RecordDict) -> LocalTrainRequest:
        return cls(str(content[CONFIG]["phase"]))


@dataclass
class LocalTrainReply:
    """A site's local run: the final adapter, the K checkpoints (tracing; adapter and
    Adam moments, `ckpt-{k}`), the digest of its sample ids (how a resumed run
    recognises it) and its metrics. The checkpoints' learning rate does not travel:
    `from_record(content, lr)` gives it to them (the server's train.lr)."""

    state: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    checkpoints: list[Checkpoint] = field(default_factory=list)
    ids_digest: str = ""
    gpu_peak_mib: float | None = None

    def to_record(self) -> RecordDict:
        content = RecordDict({
            ARRAYS: state_record(self.state),
            METRICS: MetricRecord(_gpu({NUM_EXAMPLES: int(self.num_examples), "train-loss": float(self.train_loss)},
                                       self.gpu_peak_mib)),
            SITE: ConfigRecord({"ids-digest": self.ids_digest}),
        })
        for k, ckpt in enumerate(self.checkpoints):
            content[_ckpt_key(k)] = checkpoint_record(ckpt)
        return content

    @classmethod
    def from_record(cls, content: RecordDict, lr: float = 0.0) -> LocalTrainReply:
        checkpoints = []
        while _ckpt_key(len(checkpoints)) in content:
            checkpoints.append(record_checkpoint(content[_ckpt_key(len(checkpoints))], lr))
        m = content[METRICS]
        digest = str(content[SITE]["ids-digest"]) if SITE in content else ""
        return cls(split_record(content[ARRAYS])[0], int(m[NUM_EXAMPLES]), float(m["train-loss"]), checkpoints,
                   digest, _peak(m))


REPORT_SCORES = "scores"  # privacy.report: what a site reports of its scores


@dataclass
class PrivacySettings:
    """How a site reports its scores (privacy.report, privacy.epsilon): per-sample
    scores, or binned counts over `edges` (the inner bin edges: the outer ones are -inf
    and +inf); with Gaussian noise when epsilon > 0, scores clipped to [clip_lo, clip_hi]
    first. Edges and clipping range come from the public anchor scores only."""

    report: str = REPORT_SCORES
    epsilon: float = 0.0
    delta: float = 1e-5
    edges: list[float] | None = None
    clip_lo: float | None = None
    clip_hi: float | None = None

    def to_config(self) -> dict:
        """As a flat dict (the server keeps it with the anchor's scores)."""
        out: dict = {"privacy-report": self.report}
        if self.edges is not None:
            out["edges"] = [float(e) for e in self.edges]
        if self.clip_lo is not None:
            out.update({"epsilon": float(self.epsilon), "delta": float(self.delta),
                        "clip-lo": float(self.clip_lo), "clip-hi": float(self.clip_hi)})
        return out

    @classmethod
    def from_config(cls, config) -> PrivacySettings:
        return cls(
            str(config.get("privacy-report", REPORT_SCORES)), float(config.get("epsilon", 0.0)),
            float(config.get("delta", 1e-5)),
            [float(e) for e in config["edges"]] if "edges" in config else None,
            float(config["clip-lo"]) if "clip-lo" in config else None,
            float(config["clip-hi"]) if "clip-hi" in config else None,
        )


@dataclass
class ScoreRequest:
    """Score your samples (message type "query.score"): the selection method, the trace
    checkpoints with their learning rates (`ckpt-{k}`, "lrs"), the anchor gradient at
    each (`grad-{k}`), the scorer's own settings (its AnchorSide.config: Quad's tau and
    budget, the signals' calibration) and how to report (PrivacySettings; None: exact
    per-sample scores)."""

    message_type: ClassVar[str] = "query.score"
    method: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    anchor_gradients: list[dict[str, torch.Tensor]] = field(default_factory=list)
    scorer: dict = field(default_factory=dict)
    privacy: PrivacySettings | None = None

    def to_record(self) -> RecordDict:
        content = RecordDict({
            CONFIG: ConfigRecord({"method": self.method, "lrs": [float(c.lr) for c in self.checkpoints]}),
            SCORER: ConfigRecord(dict(self.scorer)),
        })
        if self.privacy is not None:
            content[PRIVACY] = ConfigRecord(self.privacy.to_config())
        for k, ckpt in enumerate(self.checkpoints):
            content[_ckpt_key(k)] = checkpoint_record(ckpt)
        for k, grad in enumerate(self.anchor_gradients):
            content[_grad_key(k)] = gradient_record(grad)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> ScoreRequest:
        config = content[CONFIG]
        lrs = [float(x) for x in config.get("lrs", [])]
        return cls(
            str(config["method"]),
            [record_checkpoint(content[_ckpt_key(k)], lr) for k, lr in enumerate(lrs)],
            [record_gradient(content[_grad_key(k)]) for k in range(len(lrs)) if _grad_key(k) in content],
            dict(content[SCORER].items()) if SCORER in content else {},
            PrivacySettings.from_config(content[PRIVACY]) if PRIVACY in content else None,
        )


@dataclass
class ScoreReply:
    """A site's scores (message type "query.score"): its keyed-hash sample ids with
    their scores (noised under privacy.epsilon), or only the binned counts (privacy.report
    = histogram); metrics, the scorer's extras among them (a scorer that scores fewer
    samples, Quad, reports `scored`)."""

    num_examples: int
    ids: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    histogram: list[int] | None = None
    partition_id: int = -1
    score_seconds: float = 0.0
    skipped_rows: int = 0
    truncated: int = 0
    scored: int | None = None  # None: all num_examples
    extras: dict = field(default_factory=dict)
    gpu_peak_mib: float | None = None

    _CORE: ClassVar[tuple[str, ...]] = (NUM_EXAMPLES, PARTITION_ID, "score-seconds", "skipped-rows", "truncated",
                                        "scored", GPU_PEAK_KEY)

    def to_record(self) -> RecordDict:
        content = RecordDict()
        if self.histogram is not None:
            content[HISTOGRAM] = ConfigRecord({"counts": [int(c) for c in self.histogram]})
        else:
            content[SCORES] = ConfigRecord({"ids": [str(i) for i in self.ids],
                                            "scores": [float(s) for s in (self.scores or [])]})
        content[METRICS] = MetricRecord(_gpu({
            NUM_EXAMPLES: int(self.num_examples),
            PARTITION_ID: int(self.partition_id),
            "score-seconds": float(self.score_seconds),
            "skipped-rows": int(self.skipped_rows),
            "truncated": int(self.truncated),
            "scored": int(self.num_examples if self.scored is None else self.scored),
            **self.extras,
        }, self.gpu_peak_mib))
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> ScoreReply:
        m = content[METRICS]
        n = int(m[NUM_EXAMPLES])
        out = cls(n, partition_id=int(m.get(PARTITION_ID, -1)), score_seconds=float(m.get("score-seconds", 0.0)),
                  skipped_rows=int(m.get("skipped-rows", 0)), truncated=int(m.get("truncated", 0)),
                  scored=int(m.get("scored", n)), extras={k: v for k, v in m.items() if k not in cls._CORE},
                  gpu_peak_mib=_peak(m))
        if HISTOGRAM in content:
            out.histogram = [int(c) for c in content[HISTOGRAM]["counts"]]
        else:
            out.ids = [str(i) for i in content[SCORES]["ids"]]
            out.scores = [float(s) for s in content[SCORES]["scores"]]
        return out


@dataclass
class SelectRequest:
    """Apply the run's decision (message type "query.select"): keep score >= `threshold`,
    or the top `ratio` of the site's own scores; in merging mode the site's scores are
    first standardised by its anchor scores' mean and std. A resumed run, whose sites
    lost their state, sends each site its own exact scores back (`ids`, `scores`)."""

    message_type: ClassVar[str] = "query.select"
    threshold: float | None = None
    ratio: float | None = None
    anchor_mean: float | None = None
    anchor_std: float | None = None
    ids: list[str] | None = None
    scores: list[float] | None = None

    @property
    def decision(self) -> dict:
        """As selection.rules.keep takes it."""
        return {"ratio": self.ratio} if self.threshold is None else {"threshold": self.threshold}

    def to_record(self) -> RecordDict:
        config = ConfigRecord()
        if self.threshold is None:
            config["ratio"] = float(self.ratio)
        else:
            config["threshold"] = float(self.threshold)
        if self.anchor_mean is not None:
            config["anchor-mean"] = float(self.anchor_mean)
            config["anchor-std"] = float(self.anchor_std)
        content = RecordDict({CONFIG: config})
        if self.scores is not None:
            content[SCORES] = ConfigRecord({"ids": [str(i) for i in self.ids],
                                            "scores": [float(x) for x in self.scores]})
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> SelectRequest:
        config = content[CONFIG]
        out = cls(float(config["threshold"]) if "threshold" in config else None,
                  float(config["ratio"]) if "ratio" in config else None,
                  float(config["anchor-mean"]) if "anchor-mean" in config else None,
                  float(config["anchor-std"]) if "anchor-std" in config else None)
        if SCORES in content:
            out.ids = [str(i) for i in content[SCORES]["ids"]]
            out.scores = [float(x) for x in content[SCORES]["scores"]]
        return out


CONFUSION = ("tp", "fp", "fn", "tn")


@dataclass
class SelectReply:
    """What a site kept, as counts only: how many, their mean score, the confusion counts
    where its data carries quality labels (experiments), and the k-means clusters the kept
    set covers (eval.coverage)."""

    num_examples: int
    kept: int
    mean_kept_score: float = 0.0
    labelled: bool = True
    counts: dict[str, int] = field(default_factory=dict)
    clusters: tuple[int, int] | None = None  # (covered by the kept set, total)

    def to_record(self) -> RecordDict:
        metrics = {NUM_EXAMPLES: int(self.num_examples)}
        if self.clusters is not None:
            metrics.update({"clusters-covered": int(self.clusters[0]), "clusters-total": int(self.clusters[1])})
        metrics.update({"kept": int(self.kept), "mean-kept-score": float(self.mean_kept_score),
                        "labelled": int(self.labelled), **{k: int(v) for k, v in self.counts.items()}})
        return RecordDict({METRICS: MetricRecord(metrics)})

    @classmethod
    def from_record(cls, content: RecordDict) -> SelectReply:
        m = content[METRICS]
        clusters = (int(m["clusters-covered"]), int(m["clusters-total"])) if "clusters-total" in m else None
        return cls(int(m.get(NUM_EXAMPLES, 0)), int(m["kept"]), float(m["mean-kept-score"]),
                   bool(int(m.get("labelled", 1))), {k: int(m[k]) for k in CONFUSION if k in m}, clusters)


@dataclass
class SiteCost:
    """What answering one message cost a site (added to every good reply by the
    ClientApp's mod, federation/site_cost.py): the handler's wall and CPU seconds, the
    process's peak resident memory so far, and the size of its prefix cache on disk
    (None: no cache, or a message that reads no data). Counts and seconds only.

    A ConfigRecord, not a second MetricRecord: Flower's strategies want exactly one
    MetricRecord in a train reply (the server's MeteredGrid takes this one off anyway)."""

    wall_seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    cache_bytes: int | None = None

    def to_record(self) -> ConfigRecord:
        out = {"wall-seconds": float(self.wall_seconds), "cpu-seconds": float(self.cpu_seconds),
               "peak-rss-mib": float(self.peak_rss_mib)}
        if self.cache_bytes is not None:
            out["cache-bytes"] = int(self.cache_bytes)
        return ConfigRecord(out)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SiteCost:
        cache = record.get("cache-bytes")
        return cls(float(record["wall-seconds"]), float(record["cpu-seconds"]), float(record["peak-rss-mib"]),
                   int(cache) if cache is not None else None)


@dataclass
class IdentifyRequest:
    """Which site are you (message type "query.identify"): a resumed run whose sites got
    new node ids asks."""

    message_type: ClassVar[str] = "query.identify"

    def to_record(self) -> RecordDict:
        return RecordDict()

    @classmethod
    def from_record(cls, content: RecordDict) -> IdentifyRequest:
        return cls()


@dataclass
class IdentifyReply:
    """A site's answer to query.identify: the digest of its sample ids (ids_digest)."""

    ids_digest: str
    num_examples: int = 0
    partition_id: int = -1

    def to_record(self) -> RecordDict:
        return RecordDict({
            SITE: ConfigRecord({"ids-digest": self.ids_digest}),
            METRICS: MetricRecord({NUM_EXAMPLES: int(self.num_examples), PARTITION_ID: int(self.partition_id)}),
        })

    @classmethod
    def from_record(cls, content: RecordDict) -> IdentifyReply:
        m = content[METRICS] if METRICS in content else {}
        return cls(str(content[SITE]["ids-digest"]), int(m.get(NUM_EXAMPLES, 0)), int(m.get(PARTITION_ID, -1)))


@dataclass
class DescribeRequest:
    """Who are you (message type "query.site"): answered from the node config alone."""

    message_type: ClassVar[str] = "query.site"

    def to_record(self) -> RecordDict:
        return RecordDict()

    @classmethod
    def from_record(cls, content: RecordDict) -> DescribeRequest:
        return cls()


@dataclass
class SiteDescription:
    """A site's answer to query.site: its name, partition id (-1: not a simulation
    partition) and the name (not the path) of its data file, if it has one."""

    name: str
    partition_id: int = -1
    data_file: str | None = None

    def to_record(self) -> RecordDict:
        info = {"name": self.name}
        if self.data_file:
            info["data-file"] = self.data_file
        return RecordDict({SITE: ConfigRecord(info), METRICS: MetricRecord({PARTITION_ID: int(self.partition_id)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> SiteDescription:
        site = content[SITE]
        return cls(str(site["name"]), int(content[METRICS][PARTITION_ID]),
                   str(site["data-file"]) if "data-file" in site else None)
