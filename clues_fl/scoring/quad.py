"""Quad (Zhang et al., ICLR 2025): quality AND diversity by bandits over clusters.

Scoring every sample of a large pool is too costly, so Quad clusters the pool, treats
the clusters as bandit arms and scores only a small random draw of each cluster it
explores; a cluster whose mean influence is positive joins the selection whole.

Embedding (`embed_samples`)
    e(z) = c / ||c||,  c = h(z) - mean_z' h(z'),  h = mean over z's answer tokens of the
    final-norm hidden state, from the model as loaded (the initial adapter, B = 0, i.e.
    the base model). Template tokens are shared by all samples and are left out; unit
    rows make k-means' Euclidean distance a cosine distance.

Clusters (`cluster_samples`)
    k-means. k = 0 asks for the elbow of the inertia curve W(k): over candidate k
    (2 .. ~2 sqrt(N)), both axes rescaled to [0, 1], the k whose point lies farthest
    below the chord from the first to the last point ("kneedle"): past it, more
    clusters buy little. A pool above FIT_SAMPLES is fitted on a seeded random draw
    (at least 32 samples per cluster) and every sample takes its nearest centre.

K-FAC curvature (`kfac_factors`)
    A LoRA linear y = W x (W: out x in) gives sample n the gradient G_n = sum_t g_t x_t^T
    (g_t = d loss_n / d y_t). With row-major vec (torch's reshape), vec(g x^T) = g (x) x,
    so one token's Fisher is vec(G) vec(G)^T = (g g^T) (x) (x x^T). K-FAC treats x and g
    as independent:
        F = (1/N) sum_n vec(G_n) vec(G_n)^T  ~=  S (x) A,
        A = mean over counted tokens of x x^T,   S = (1/N) sum_n sum_t g_t g_t^T,
    exact for one sample with one counted token. (method.md's A (x) S is the same
    matrix for column-major vec.) Counted tokens: a sample's positions up to its last
    answer-predicting one; later positions (its final token, padding) never reach the
    loss under causal attention, so g = 0 there and their x x^T would only dilute A.
    With A = Q_A diag(a) Q_A^T, S = Q_S diag(s) Q_S^T:
        S (x) A = (Q_S (x) Q_A) diag(E) (Q_S (x) Q_A)^T,   E_ij = s_i a_j.
    EK-FAC (George et al. 2018) keeps the eigenbasis but takes F's exact diagonal in it,
        E_ij = (1/N) sum_n (Q_S^T G_n Q_A)_ij^2,
    the best diagonal in that basis (Frobenius), from per-sample gradients.
    Factors are per LoRA linear (block-diagonal over layers) and stored in float64.

Inverse-Hessian-vector product (`inverse_hvp`)
        (F + lambda I)^-1 vec(V) = vec( Q_S [ (Q_S^T V Q_A) / (E + lambda) ] Q_A^T )
    (rotate into the eigenbasis, DIVIDE elementwise, rotate back). The public Quad code
    multiplies by E + lambda instead, which is (F + lambda I) v, not its inverse.
    lambda = damping * mean(E): mean(E) is the layer's mean eigenvalue, so the damping
    is relative and scale-free, like DataInf's per-element mean square. A layer with
    E = 0 (lora_A while B = 0: g_A = B^T g = 0) has no curvature and no gradient, and
    gets a zero output instead of 0 / lambda.
    The influence of z on the anchor loss is grad(z)^T H^-1 G_anchor: pass
    `inverse_hvp(factors, G_anchor)` as `reference` to `engine.score_batch`.

Bandit (`ClusterBandit`)
    CS_c = R_c / n_c + alpha sqrt(2 ln(sum_c' n_c') / (n_c + 1)),
    R_c = summed rewards of cluster c, n_c = its draws. An unexplored cluster
    (n_c = 0) has R_c / n_c = +inf: every cluster is tried once before any is re-drawn.

Selection loop (`quad_select`)
    Each iteration draws, from the top `arms_per_iteration` clusters by CS,
    ceil(sampling_ratio * |c|) not-yet-scored samples; reward = mean influence - tau.
    A cluster with R_c / n_c > 0 joins the selection and leaves the arms; so does
    (without joining) a fully scored one. Stops at the budget, at the scoring cap or
    when no arm is left.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.cluster import KMeans
from clues_fl.console import progress as tqdm

from clues_fl.config import QuadSection, RunConfig
from clues_fl.scoring.alignment import TokenCapture, _backward, per_sample_gradients
from clues_fl.model.forward import iterate_batches
from clues_fl.model.loading import lora_linears
from clues_fl.model.device import device_of, to_host
from clues_fl.model.forward import Batch, final_hidden
from clues_fl.model.loading import backbone, load_lora_state

# --------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed_samples(model, encoded: Sequence, first_layer: int, *, pad_id: int, batch_size: int = 8,
                  cache=None) -> np.ndarray:
    """(N, hidden) float32 unit rows: the final-norm hidden state averaged over the
    sample's ANSWER tokens, centred on the site's mean embedding.

    Every sample shares the chat template and system prompt; pooling over them (or not
    centring) makes all embeddings nearly parallel and the clusters arbitrary.
    Uses the model as loaded (the caller loads the initial adapter, B = 0, so this is
    the base model) and the split forward, starting from `cache`'s prefix states.
    """
    hidden_size = backbone(model).config.hidden_size
    # float32 rows, held as offsets from the first batch's mean (so float32 keeps the
    # small differences between samples that centring leaves), summed in float64
    out = np.zeros((len(encoded), hidden_size), dtype=np.float32)
    total = np.zeros(hidden_size, dtype=np.float64)
    origin = None
    batches = (len(encoded) + batch_size - 1) // batch_size
    for batch in tqdm(iterate_batches(encoded, batch_size, pad_id, cache, device_of(model)), total=batches,
                      desc="embed", leave=False, disable=batches < 4):
        hidden = final_hidden(model, batch, first_layer).double()
        # answer tokens: position t + 1 for every t that predicts an answer token
        answer = torch.zeros_like(batch.target_mask)
        answer[:, 1:] = batch.target_mask[:, :-1]
        mask = answer.unsqueeze(-1).double()
        pooled = to_host((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        if origin is None:
            origin = pooled.mean(0)
        out[batch.rows] = pooled - origin
        total += (pooled - origin).sum(0)
    if len(out) > 1:
        out -= (total / len(out)).astype(np.float32)
    for start in range(0, len(out), 65536):  # unit rows, in place
        block = out[start : start + 65536]
        block /= np.maximum(np.linalg.norm(block.astype(np.float64), axis=1, keepdims=True), 1e-12).astype(np.float32)
    return out


# --------------------------------------------------------------------------- clustering

ELBOW_POINTS = 16  # candidate k values tried by the elbow rule (geometric grid)


def elbow_candidates(n: int, max_clusters: int | None = None) -> list[int]:
    """k values the elbow rule tries: a geometric grid over 2 .. min(cap, n - 1)."""
    cap = max_clusters if max_clusters is not None else math.ceil(2 * math.sqrt(n))
    upper = min(cap, n - 1)
    if upper < 2:
        return []
    grid = np.geomspace(2, upper, num=min(upper - 1, ELBOW_POINTS))
    return sorted({round(float(k)) for k in grid})


def elbow_index(ks: Sequence[float], inertias: Sequence[float]) -> int:
    """Index of the knee: the point farthest below the first-to-last chord (kneedle).

    Both axes are rescaled to [0, 1] first so the answer does not depend on units; the
    vertical gap to the chord is proportional to the perpendicular distance.
    """
    x, y = np.asarray(ks, dtype=float), np.asarray(inertias, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0
    x = (x - x[0]) / (x[-1] - x[0])
    y = (y - y.min()) / np.ptp(y)
    chord = y[0] + (y[-1] - y[0]) * x
    return int(np.argmax(chord - y))


# k-means is fitted on all samples up to FIT_SAMPLES, above that on a seeded random
# draw of max(FIT_SAMPLES, SAMPLES_PER_CLUSTER x the largest k tried), and every sample
# takes its nearest centre: the fit's cost stops growing with the pool (it grows with
# k^2, and the elbow rule's k with sqrt(N), so linearly), the assignment is O(N k d).
FIT_SAMPLES = 8192
SAMPLES_PER_CLUSTER = 32


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int) -> KMeans:
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)


def cluster_samples(embeddings: np.ndarray, n_clusters: int, *, seed: int = 0, max_clusters: int | None = None,
                    n_init: int = 3, fit_samples: int = FIT_SAMPLES) -> np.ndarray:
    """k-means labels (N,) int64; `n_clusters=0` picks k by the elbow rule.

    k is clipped to N; with the elbow rule and N <= 2 everything is one cluster.
    Pools larger than `fit_samples` (and than 32 samples per cluster) are fitted on a
    seeded random draw and assigned to the nearest centre (FIT_SAMPLES).
    Deterministic for a seed.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty (N, d) array, got shape {x.shape}")
    if n_clusters < 0:
        raise ValueError(f"n_clusters must be >= 0 (0 = elbow rule), got {n_clusters}")
    if max_clusters is not None and max_clusters < 2:
        raise ValueError(f"max_clusters must be >= 2, got {max_clusters}")
    n = len(x)
    ks = [min(n_clusters, n)] if n_clusters > 0 else elbow_candidates(n, max_clusters)
    if not ks:
        return np.zeros(n, dtype=np.int64)
    draw = max(fit_samples, SAMPLES_PER_CLUSTER * max(ks))
    fit_rows = np.sort(np.random.default_rng(seed).choice(n, draw, replace=False)) if n > draw else None
    sample = x if fit_rows is None else x[fit_rows]
    fits = [_kmeans(sample, k, seed, n_init) for k in ks]
    best = fits[elbow_index(ks, [f.inertia_ for f in fits])] if n_clusters == 0 else fits[0]
    if fit_rows is None:
        return best.labels_.astype(np.int64)
    return np.concatenate([best.predict(x[s : s + 65536]) for s in range(0, n, 65536)]).astype(np.int64)


# --------------------------------------------------------------------------- K-FAC / EK-FAC


@dataclass
class KfacFactor:
    """One LoRA linear's curvature (Q_S (x) Q_A) diag(E) (Q_S (x) Q_A)^T, float64."""

    q_a: torch.Tensor  # (in, in) eigenvectors of A (columns)
    lam_a: torch.Tensor  # (in,)
    q_s: torch.Tensor  # (out, out) eigenvectors of S
    lam_s: torch.Tensor  # (out,)
    eigen: torch.Tensor  # (out, in): lam_s[i] * lam_a[j], or the EK-FAC diagonal
    corrected: bool = False  # True once `eigen` is the EK-FAC diagonal

    @classmethod
    def from_covariances(cls, a: torch.Tensor, s: torch.Tensor) -> KfacFactor:
        """Eigendecompose A (in x in) and S (out x out); E = outer(lam_S, lam_A)."""
        lam_a, q_a = torch.linalg.eigh(a.double())
        lam_s, q_s = torch.linalg.eigh(s.double())
        # both are PSD: negative eigenvalues are round-off only
        lam_a, lam_s = lam_a.clamp(min=0), lam_s.clamp(min=0)
        return cls(q_a, lam_a, q_s, lam_s, torch.outer(lam_s, lam_a))

    def damping(self, damping: float) -> float:
        """Absolute lambda = damping * mean eigenvalue of this layer."""
        return damping * float(self.eigen.mean())


def counted_tokens(batch: Batch) -> torch.Tensor:
    """(B, T) bool: positions up to each sample's last answer-predicting position.

    Later positions (the final token, padding) cannot reach the loss through causal
    attention, so g = 0 there and they are left out of A.
    """
    reach = batch.target_mask.long().flip(1).cummax(1).values.flip(1).bool()
    return reach & batch.attention_mask.bool()


def _captured(model, batch: Batch, first_layer: int):
    """x and g of every LoRA linear for one batch (per-sample losses, one backward)."""
    with TokenCapture(model) as cap:
        _backward(model, batch, first_layer)
    for name, _ in cap.linears:
        if name not in cap.grads:
            raise RuntimeError(f"no output gradient captured for {name}")
    return cap


def kfac_factors(model, encoded: Sequence, first_layer: int, *, pad_id: int, batch_size: int = 8, cache=None,
                 eigen_correction: bool = False, desc: str = "kfac") -> dict[str, KfacFactor]:
    """{LoRA weight name: KfacFactor} over `encoded` at the model's current adapter.

    One pass gives A and S (and their eigenbases); `eigen_correction=True` (EK-FAC)
    adds a second pass for E_ij = mean_n (Q_S^T G_n Q_A)_ij^2.
    """
    n = len(encoded)
    if n == 0:
        raise ValueError("kfac_factors needs at least one sample")
    batches = (n + batch_size - 1) // batch_size
    bar = tqdm(total=batches * (2 if eigen_correction else 1), desc=desc, leave=False, disable=batches < 4)

    a_sum: dict[str, torch.Tensor] = {}
    s_sum: dict[str, torch.Tensor] = {}
    tokens = 0
    device = device_of(model)
    for batch in iterate_batches(encoded, batch_size, pad_id, cache, device):
        cap = _captured(model, batch, first_layer)
        mask = counted_tokens(batch)
        tokens += int(mask.sum())
        for name, _ in cap.linears:
            x = cap.inputs[name][mask].double()  # (tokens, in)
            g = cap.grads[name][mask].double()  # (tokens, out)
            a_sum[name] = a_sum.get(name, 0) + x.T @ x
            s_sum[name] = s_sum.get(name, 0) + g.T @ g
        bar.update(1)
    if tokens == 0:
        raise ValueError("no sample has an answer token: nothing to estimate K-FAC factors from")
    factors = {name: KfacFactor.from_covariances(a_sum[name] / tokens, s_sum[name] / n) for name in a_sum}

    if eigen_correction:
        diag = {name: torch.zeros_like(f.eigen) for name, f in factors.items()}
        for batch in iterate_batches(encoded, batch_size, pad_id, cache, device):
            cap = _captured(model, batch, first_layer)
            mask = counted_tokens(batch).unsqueeze(-1)
            for name, _ in cap.linears:
                f = factors[name]
                per_sample = torch.einsum("bto,bti->boi", cap.grads[name].double() * mask,
                                          cap.inputs[name].double())
                diag[name] += (f.q_s.T @ per_sample @ f.q_a).pow(2).sum(0)
            bar.update(1)
        factors = {name: replace(f, eigen=diag[name] / n, corrected=True) for name, f in factors.items()}
    bar.close()
    return factors


def inverse_hvp(factors: dict[str, KfacFactor], vectors: dict[str, torch.Tensor],
                damping: float) -> dict[str, torch.Tensor]:
    """Per layer (F + lambda I)^-1 vec(V) = Q_S [(Q_S^T V Q_A) / (E + lambda)] Q_A^T.

    lambda = damping * mean(E) of that layer; an all-zero E gives zeros. Keys, shapes
    and dtypes follow `vectors`, so the result is a valid `engine.score_batch` reference.
    """
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (relative to the mean eigenvalue), got {damping}")
    out = {}
    for name, v in vectors.items():
        if name not in factors:
            raise ValueError(f"no K-FAC factor for {name!r} (factors cover {len(factors)} LoRA weights)")
        f = factors[name]
        if tuple(v.shape) != tuple(f.eigen.shape):
            raise ValueError(f"{name}: vector shape {tuple(v.shape)} != layer shape {tuple(f.eigen.shape)}")
        out[name] = layer_inverse_hvp(f, v, f.damping(damping))
    return out


def layer_inverse_hvp(factor: KfacFactor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """(F + lam I)^-1 vec(V) for one layer with an ABSOLUTE lam; lam <= 0 gives zeros."""
    if lam <= 0:
        return torch.zeros_like(v)
    rotated = factor.q_s.T @ v.double() @ factor.q_a
    damped = factor.q_s @ (rotated / (factor.eigen + lam)) @ factor.q_a.T
    return damped.to(dtype=v.dtype, device=v.device)


# --------------------------------------------------------------------------- bandit


class ClusterBandit:
    """UCB over clusters: CS_c = R_c / n_c + alpha sqrt(2 ln(sum n) / (n_c + 1)).

    Unexplored arms (n_c = 0) score +inf so each is tried once first; removed arms
    score -inf. `sum n` counts every draw so far, removed arms included.
    """

    def __init__(self, n_arms: int, alpha: float = 1.0):
        if n_arms < 1:
            raise ValueError(f"n_arms must be >= 1, got {n_arms}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.pulls = np.zeros(n_arms, dtype=np.int64)
        self.rewards = np.zeros(n_arms)
        self.active = np.ones(n_arms, dtype=bool)

    @property
    def n_arms(self) -> int:
        return len(self.pulls)

    def mean_reward(self, arm: int) -> float:
        """R_c / n_c (NaN before the first draw)."""
        return self.rewards[arm] / self.pulls[arm] if self.pulls[arm] else math.nan

    def ucb(self) -> np.ndarray:
        total = self.pulls.sum()
        bonus = self.alpha * np.sqrt(2 * math.log(total) / (self.pulls + 1)) if total > 0 else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(self.pulls > 0, self.rewards / np.maximum(self.pulls, 1), np.inf)
        return np.where(self.active, mean + bonus, -np.inf)

    def select(self, count: int = 1, rng: np.random.Generator | None = None) -> list[int]:
        """The `count` active arms with the highest UCB; ties broken by `rng` (else by index)."""
        scores = self.ucb()
        tiebreak = rng.permutation(self.n_arms) if rng is not None else np.arange(self.n_arms)
        order = np.lexsort((tiebreak, -scores))
        return [int(a) for a in order[:count] if self.active[a]]

    def update(self, arm: int, reward: float) -> None:
        if not self.active[arm]:
            raise ValueError(f"arm {arm} was removed")
        self.pulls[arm] += 1
        self.rewards[arm] += reward

    def remove(self, arm: int) -> None:
        self.active[arm] = False


# --------------------------------------------------------------------------- selection loop


@dataclass
class QuadResult:
    kept: np.ndarray  # (N,) bool: the selection
    scored: np.ndarray  # rows passed to score_fn, in scoring order
    influence: np.ndarray  # (N,) score_fn values, NaN where not scored
    clusters: np.ndarray  # (C,) cluster labels; pulls / rewards follow this order
    pulls: np.ndarray  # (C,) draws per cluster
    rewards: np.ndarray  # (C,) summed rewards (mean influence - tau) per cluster
    selected_clusters: list  # labels of the clusters that joined, in order
    iterations: int
    stop_reason: str  # "budget", "scoring_cap" or "no_arms"

    @property
    def n_scored(self) -> int:
        return len(self.scored)

    @property
    def scored_fraction(self) -> float:
        return self.n_scored / len(self.kept)

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())


def quad_select(labels: np.ndarray, score_fn: Callable[[list[int]], np.ndarray], *, budget: int,
                sampling_ratio: float = 0.05, tau: float = 0.0, alpha: float = 1.0, arms_per_iteration: int = 1,
                max_scored_fraction: float = 0.25, seed: int = 0) -> QuadResult:
    """Quad's bandit loop over clusters `labels` (N,); `score_fn(rows)` gives their influence.

    Each draw takes ceil(sampling_ratio * |c|) (>= 1) unscored samples of a cluster at
    random (seeded). The scored fraction can pass `max_scored_fraction` by at most one
    iteration's draws (the cap is checked between iterations). If the last cluster to
    join overshoots the budget, exactly `budget` samples are kept: its scored samples by
    decreasing influence, then its unscored ones in seeded random order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1 or n == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not 0 < sampling_ratio <= 1:
        raise ValueError(f"sampling_ratio must be in (0, 1], got {sampling_ratio}")
    if not 0 < max_scored_fraction <= 1:
        raise ValueError(f"max_scored_fraction must be in (0, 1], got {max_scored_fraction}")
    if arms_per_iteration < 1:
        raise ValueError(f"arms_per_iteration must be >= 1, got {arms_per_iteration}")

    rng = np.random.default_rng(seed)
    clusters, inverse = np.unique(labels, return_inverse=True)
    # a seeded shuffle per cluster: draws walk down it, so unscored = queue[drawn:]
    queues = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(clusters))]
    drawn = np.zeros(len(clusters), dtype=np.int64)
    bandit = ClusterBandit(len(clusters), alpha)
    influence = np.full(n, np.nan)
    scored: list[int] = []
    kept = np.zeros(n, dtype=bool)
    selected: list = []
    iterations = 0

    def draw(arm: int) -> np.ndarray:
        queue = queues[arm]
        size = max(1, math.ceil(sampling_ratio * len(queue)))
        rows = queue[drawn[arm] : drawn[arm] + size]
        drawn[arm] += len(rows)
        values = np.asarray(score_fn([int(r) for r in rows]), dtype=float).reshape(-1)
        if len(values) != len(rows):
            raise ValueError(f"score_fn returned {len(values)} values for {len(rows)} rows")
        if not np.isfinite(values).all():
            raise FloatingPointError(f"score_fn returned non-finite influence for rows {rows[~np.isfinite(values)][:5]}")
        influence[rows] = values
        scored.extend(int(r) for r in rows)
        return values

    def join(arm: int) -> None:
        queue = queues[arm]
        room = budget - int(kept.sum())
        if len(queue) > room:  # keep the best scored ones, then random unscored ones
            done = queue[: drawn[arm]]
            done = done[np.argsort(-influence[done], kind="stable")]
            queue = np.concatenate([done, queue[drawn[arm] :]])[:room]
        kept[queue] = True
        selected.append(clusters[arm].item())

    while True:
        if kept.sum() >= budget:
            stop_reason = "budget"
            break
        if not bandit.active.any():
            stop_reason = "no_arms"
            break
        if len(scored) >= max_scored_fraction * n:
            stop_reason = "scoring_cap"
            break
        arms = bandit.select(arms_per_iteration, rng)
        iterations += 1
        for arm in arms:
            values = draw(arm)
            bandit.update(arm, float(values.mean()) - tau)
            if bandit.mean_reward(arm) > 0:
                bandit.remove(arm)
                join(arm)
                if kept.sum() >= budget:
                    break
            elif drawn[arm] >= len(queues[arm]):
                bandit.remove(arm)  # fully scored and not good enough: nothing left to learn

    return QuadResult(kept, np.asarray(scored, dtype=np.int64), influence, clusters, bandit.pulls.copy(),
                      bandit.rewards.copy(), selected, iterations, stop_reason)


# -- the federated protocol's server side ------------------------------------------------
@dataclass
class AnchorInfluence:
    scores: np.ndarray  # (n,) leave-one-out influence of each anchor, lr-weighted over checkpoints
    references: list[dict[str, torch.Tensor]]  # H_k^-1 G_k per checkpoint: what the sites dot with


def anchor_influence(bench, anchors, checkpoints, quad: QuadSection | RunConfig, settings, *,
                     cache=None) -> AnchorInfluence:
    """The server's part of Quad: per checkpoint, K-FAC factors on the public anchor set
    (no site statistics needed), the reference H^-1 G_anchor the sites take inner
    products with, and each anchor's influence against the others,
    H^-1 G_-a = (n H^-1 G - H^-1 g_a) / (n - 1), scored exactly like a site's sample
    (so tau can be a quantile of clean-sample influence).

    `quad`: the run-config's `quad` section (`quad.damping`, `quad.ekfac`); a whole
    RunConfig stands for its own section."""
    if isinstance(quad, RunConfig):
        quad = quad.quad
    model, n = bench.model, len(anchors)
    if n < 2:
        raise ValueError(f"the anchor set needs at least 2 samples, got {n}")
    damping = quad.damping
    total, references = np.zeros(n), []
    for ckpt in checkpoints:
        load_lora_state(model, ckpt.state)
        factors = kfac_factors(model, anchors, bench.first_layer, pad_id=bench.pad_id,
                               batch_size=settings.batch_size, cache=cache, eigen_correction=quad.ekfac)
        names = [name for name, _ in lora_linears(model)]
        grads: dict[str, torch.Tensor] = {}
        device = device_of(model)
        for batch in iterate_batches(anchors, settings.batch_size, bench.pad_id, cache, device):
            for name, g in per_sample_gradients(model, batch, bench.first_layer).items():
                grads.setdefault(name, torch.zeros((n, *g.shape[1:]), dtype=torch.float64, device=device))[
                    batch.rows] = g.double()
        reference = inverse_hvp(factors, {nm: grads[nm].mean(0) for nm in names}, damping)
        dots = np.zeros(n)
        for a in range(n):
            own = inverse_hvp(factors, {nm: grads[nm][a] for nm in names}, damping)
            loo = {nm: (n * reference[nm] - own[nm]) / (n - 1) for nm in names}
            dot = sum(float((grads[nm][a] * loo[nm]).sum()) for nm in names)
            if settings.similarity == "cosine":
                norm_g = math.sqrt(sum(float(grads[nm][a].pow(2).sum()) for nm in names))
                norm_r = math.sqrt(sum(float(loo[nm].pow(2).sum()) for nm in names))
                dot /= max(norm_g * norm_r, 1e-30)
            dots[a] = dot
        total += ckpt.lr * dots
        references.append({nm: reference[nm].to("cpu", ckpt.state[nm].dtype) for nm in names})  # travels
    return AnchorInfluence(total, references)


def embed_with_model(name: str, samples) -> np.ndarray:
    """Unit sentence embeddings of each sample's question and answer under a user-named
    embedding model that must be available offline (model/sentence_encoder.py)."""
    from clues_fl.model.sentence_encoder import embed_texts

    return embed_texts([f"{s.question}\n{s.answer}" for s in samples], name, key="quad.embedding-model")
