"""One-shot merging of client LoRA adapters on the server.

A LoRA module adds ``dW = scaling * B @ A`` to a frozen weight. Merging must act on
``dW``: averaging the factors gives ``mean(B) @ mean(A)``, which contains the cross
terms ``B_i @ A_j`` (i != j) and is *not* the average update (see the tests).

peft's ``add_weighted_adapter`` does the work:

- ``linear``/``weighted`` use ``combination_type="cat"``: the merged adapter stacks
  ``A = cat_i(w_i * scaling_i * A_i)`` (rows) and ``B = cat_i(B_i)`` (columns) with
  ``r = lora_alpha = sum_i r_i`` (so its own scaling is 1), hence
  ``B @ A = sum_i w_i * scaling_i * B_i @ A_i = sum_i w_i dW_i`` exactly
  (peft/tuners/lora/model.py, add_weighted_adapter). peft's ``"linear"`` would
  instead average the factors separately: exactly the mistake described above.
- ``ties`` uses ``combination_type="ties_svd"``: TIES (trim each ``dW_i`` to its
  top-``density`` magnitudes, elect a sign per entry, average the entries that
  agree with it) on the full ``dW_i``, then a truncated SVD back to rank
  ``svd_rank``. peft's plain ``"ties"`` would again work on A and B separately.

**Merge rules.** A rule is a pure function of peft's ``merge_utils`` shape,
``rule(task_tensors: list[Tensor], weights: Tensor[, density]) -> Tensor``, applied to
each adapted module's ``dW_i`` (``task_tensors``) with the sites' merge weights; the
built-in rules and how each site is weighted are registered in ``MERGE_RULES`` (the one
place). ``merge.rule = "module:function"`` names your own rule (uniform site weights;
``density`` = merge.density is passed when the function takes it): its merged ``dW`` is
brought back to a LoRA adapter by truncated SVD at rank ``sum_i r_i`` (capped at the
modules' ``min(out, in)``): exact for a linear rule (a weighted sum of the sites'
updates has at most that rank), the best approximation of that rank otherwise. The built-in
rules compute the same result through peft's ``add_weighted_adapter`` in low rank
(``MergeRule.exact``: ``cat`` exactly, ``ties_svd`` with the same SVD).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils

from clues_fl import plugins


_STATE_ADAPTER = "default"  # adapter name inside lora_state() keys
_LORA_KEY = re.compile(r"\.(lora_[AB])\.([^.]+)\.")


def uniform_weights(kept_counts: list[int], mean_scores: list[float]) -> list[float]:
    """``1/n`` for every site (``linear``, ``ties``, your own rules)."""
    n = len(kept_counts)
    return [1.0 / n] * n


def score_weights(kept_counts: list[int], mean_scores: list[float], *, temperature: float = 1.0) -> list[float]:
    """``weighted``: ``w_i ∝ kept_i * exp((mean_i - max_j mean_j) / temperature)`` (see merge_weights)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = len(kept_counts)
    counts = np.asarray(kept_counts, dtype=float)
    scores = np.asarray(mean_scores, dtype=float)
    if (counts < 0).any():
        raise ValueError(f"kept_counts must be >= 0, got {list(kept_counts)}")
    active = counts > 0
    if not active.any():
        raise ValueError("weighted merging: every client kept 0 samples")
    if not np.isfinite(scores[active]).all():
        raise ValueError(
            f"weighted merging: non-finite mean score for a client with kept samples: {list(mean_scores)}"
        )
    logits = np.full(n, -np.inf)
    logits[active] = np.log(counts[active]) + (scores[active] - scores[active].max()) / temperature
    w = np.exp(logits - logits[active].max())
    return (w / w.sum()).tolist()


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i dW_i`` (``linear``, ``weighted``; peft ``merge_utils.task_arithmetic``)."""
    return merge_utils.task_arithmetic(task_tensors, weights)


def ties_mean(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float = 0.5) -> torch.Tensor:
    """TIES on the ``dW_i`` (``ties``): trim each to its top-``density`` magnitudes, elect a
    sign per entry, and average the entries that agree with it. peft's disjoint merge
    divides the sum of the agreeing weighted entries by their count, so the weights are
    rescaled to average 1 (uniform ``1/n`` -> 1 each): the TIES paper's disjoint mean."""
    return merge_utils.ties(task_tensors, weights * len(task_tensors), density)


@dataclass(frozen=True)
class MergeRule:
    """A one-shot merge: `combine` (peft merge_utils shape) on each module's ``dW_i``,
    `site_weights(kept_counts, mean_scores)` the sites' weights, and `exact` the peft
    ``add_weighted_adapter`` combination that computes `combine` in low rank (None: the
    merged ``dW`` is brought back to LoRA by truncated SVD)."""

    name: str
    combine: Callable[..., torch.Tensor]
    site_weights: Callable[[list[int], list[float]], list[float]] = uniform_weights
    exact: str | None = None


MERGE_RULES: dict[str, MergeRule] = {
    "linear": MergeRule("linear", task_arithmetic, uniform_weights, exact="cat"),
    "weighted": MergeRule("weighted", task_arithmetic, score_weights, exact="cat"),
    "ties": MergeRule("ties", ties_mean, uniform_weights, exact="ties_svd"),
}
MERGE_METHODS = tuple(MERGE_RULES)


def merge_rule(name: str) -> MergeRule:
    """The registered rule ``name``, or your function ``module:function`` (uniform weights)."""
    if name in MERGE_RULES:
        return MERGE_RULES[name]
    if not plugins.is_reference(name):
        raise ValueError(f"merge.rule: unknown merge rule '{name}': expected one of {', '.join(MERGE_METHODS)} "
                         "or 'module:function'")
    return MergeRule(name, plugins.load(name, "merge.rule", accepts=callable, expected="a function"))


def rule_name(rule) -> str:
    """The merge.rule value of a rule: a name, a registered MergeRule, or your function."""
    if isinstance(rule, str):
        return rule
    if isinstance(rule, MergeRule):
        if MERGE_RULES.get(rule.name) is not rule:
            raise ValueError(f"merge rule '{rule.name}' is not registered in MERGE_RULES: register it there "
                             "or pass your function (module:function)")
        return rule.name
    return plugins.reference(rule)


def merge_weights(
    method: str,
    kept_counts: list[int],
    mean_scores: list[float],
    *,
    temperature: float = 1.0,
) -> list[float]:
    """Per-client merge weights summing to 1.

    - ``linear`` and ``ties``: uniform ``1/n`` (TIES resolves conflicts itself by
      sign election; :func:`merge_adapters` turns the uniform weights into the TIES
      paper's disjoint mean).
    - ``weighted``: ``w_i ∝ kept_i * exp((mean_i - max_j mean_j) / temperature)``.

      Scores can be negative (cosines, standardised scores), so a plain
      ``kept * mean`` is meaningless. A softmax is invariant to shifting the scores,
      never gives a client a negative or exactly-zero weight (unlike
      ``kept * (mean - min + eps)``, which zeroes the worst client even when all
      clients are nearly equal), and reduces to FedAvg's count weighting when the
      mean scores are equal. In merging mode scores are standardised by the
      anchors' spread (``selection.standardise``), so with ``temperature=1`` a client
      whose kept samples score one anchor-std higher gets ``e`` times the weight per
      sample. Clients that kept nothing get weight 0 (their mean score may be NaN).
    """
    rule = merge_rule(method)
    n = len(kept_counts)
    if n == 0:
        raise ValueError("merge_weights needs at least one client")
    if len(mean_scores) != n:
        raise ValueError(f"{n} kept_counts but {len(mean_scores)} mean_scores")
    if rule.site_weights is score_weights:
        return score_weights(kept_counts, mean_scores, temperature=temperature)
    return rule.site_weights(kept_counts, mean_scores)


@dataclass
class FinalAdapter:
    """What the aggregate phase produced: the adapter the report evaluates and saves.

    Either one adapter `state` (retraining in rounds of fed.strategy: the last global
    adapter), or the sites' retrained `site_states` with the merge `rule` and each site's
    merge `weights` (one-shot merging; peft builds the merged adapter when it is used,
    :func:`merge_adapters`). `sites` names the sites in merge order."""

    state: dict[str, torch.Tensor] | None = None
    rule: str | None = None
    sites: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    site_states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    density: float = 0.5  # merge.density (ties, and your rules that take it)

    @property
    def merged(self) -> bool:
        return self.rule is not None

    @property
    def merge_weights(self) -> dict[str, float]:
        """Site name -> its merge weight (empty for a single adapter state)."""
        return dict(zip(self.sites, self.weights))

    @contextlib.contextmanager
    def active(self, model: PeftModel, base_state: dict[str, torch.Tensor]):
        """`model` with this adapter active: its state loaded into the 'default' adapter
        (`base_state` when it has none), or the one-shot merge of the site states as
        adapter 'merged' (merge_adapters), removed after."""
        if not self.merged:
            from clues_fl.model.loading import load_lora_state

            load_lora_state(model, self.state if self.state is not None else base_state, complete=True)
            yield model
            return
        merge_adapters(model, self.site_states, self.weights, self.rule, density=self.density)
        try:
            yield model
        finally:
            model.set_adapter("default")
            model.delete_adapter("merged")


def plan_merge(rule: str, sites: list[tuple[str, int, float, dict[str, torch.Tensor]]],
               density: float = 0.5) -> FinalAdapter:
    """The one-shot merge of `sites` given as (name, kept samples, mean kept score,
    retrained state): ordered by name (node ids are drawn anew when a run restarts, and
    the merge order must not change with them), weighted as the rule says (merge_weights)."""
    ordered = sorted(sites, key=lambda s: s[0])
    weights = merge_weights(rule, [s[1] for s in ordered], [s[2] for s in ordered])
    return FinalAdapter(rule=rule, sites=[s[0] for s in ordered], weights=list(weights),
                        site_states=[s[3] for s in ordered], density=density)


def lora_deltas(model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """Module name -> ``dW = scaling * B @ A`` of one adapter (detached)."""
    out = {
        name: module.get_delta_weight(adapter_name).detach()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    if not out:
        raise ValueError(f"adapter '{adapter_name}' has no LoRA modules in this model")
    return out


def _state_rank(state: dict[str, torch.Tensor], index: int) -> int:
    ranks = {tuple(v.shape)[0] for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"client {index}: expected one LoRA rank across modules, found {sorted(ranks)}")
    return ranks.pop()


def _load_as(model: PeftModel, state: dict[str, torch.Tensor], name: str, index: int) -> None:
    params = dict(model.named_parameters())
    expected = {k for k in params if f".{name}." in k and _LORA_KEY.search(k)}
    renamed = {}
    for key, value in state.items():
        match = _LORA_KEY.search(key)
        if match is None or match.group(2) != _STATE_ADAPTER:
            raise ValueError(f"client {index}: unexpected adapter tensor '{key}'")
        renamed[_LORA_KEY.sub(rf".\1.{name}.", key, count=1)] = value
    if set(renamed) != expected:
        missing = sorted(expected - set(renamed))[:3]
        extra = sorted(set(renamed) - expected)[:3]
        raise ValueError(
            f"client {index}: adapter tensors do not match the model (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for key, value in renamed.items():
            param = params[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"client {index}: '{key}' has shape {tuple(value.shape)}, model expects {tuple(param.shape)}"
                )
            param.copy_(torch.as_tensor(value, dtype=param.dtype, device=param.device))


def merge_adapters(
    model: PeftModel,
    states: list[dict[str, torch.Tensor]],
    weights: list[float],
    method: str,
    density: float = 0.5,
    *,
    svd_rank: int | None = None,
    adapter_name: str = "merged",
) -> PeftModel:
    """Merge client adapter states into adapter ``adapter_name``, made active; returns ``model``.

    ``states`` are ``lora_state`` dicts (adapter name ``default`` in the keys). Each
    is loaded as adapter ``client{i}`` with the configuration of the model's
    ``default`` adapter (a state of another rank keeps that ``lora_alpha``, i.e.
    scaling ``alpha / r_i``), merged with peft's ``add_weighted_adapter`` and
    deleted again. The model's own ``default`` adapter is left untouched but
    inactive; an existing ``adapter_name`` adapter is replaced.

    - ``linear``/``weighted``: merged ``dW = sum_i weights[i] * dW_i`` exactly
      (rank ``sum_i r_i``).
    - ``ties``: TIES on the ``dW_i`` with ``density`` (fraction of entries kept per
      client). peft's disjoint merge divides the sum of the agreeing weighted entries
      by their *count*, so the weights are rescaled to average 1 (uniform ``1/n`` ->
      1 each): an entry then becomes the plain mean of the clients agreeing with
      the elected sign, as in the TIES paper. The result is brought back to rank
      ``svd_rank`` by truncated SVD (the best approximation of that rank; default
      ``sum_i r_i``, as for ``cat``, capped at the smallest ``min(out, in)`` of the
      adapted modules, where it is exact).

    With a single client peft falls back to its linear rule, which is exact for one
    adapter: ``dW = weights[0] * dW_0`` (``ties`` neither trims nor rescales then),
    up to peft passing the weight through a float32 tensor (~1e-7 relative; the
    same holds for the TIES weights, while ``cat`` uses the Python floats).
    ``set_adapter`` makes the merged adapter the trainable one, so ``lora_state``
    afterwards returns its tensors (named ``...{adapter_name}...``).
    """
    rule = merge_rule(method)
    if not states:
        raise ValueError("merge_adapters needs at least one client state")
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"non-finite merge weight: {weights}")
    if rule.exact != "cat" and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    template_name = _STATE_ADAPTER if _STATE_ADAPTER in model.peft_config else model.active_adapter
    template = model.peft_config[template_name]
    if getattr(template, "use_dora", False) or getattr(template, "use_rslora", False):
        raise NotImplementedError("merging assumes plain LoRA (no DoRA / rsLoRA scaling)")
    if template.rank_pattern or template.alpha_pattern:
        raise NotImplementedError("merging assumes one rank and alpha for all modules")

    names = [f"client{i}" for i in range(len(states))]
    if model.active_adapter in (*names, adapter_name):
        model.set_adapter(template_name)  # deleting the active adapter makes peft warn
    for stale in [*names, adapter_name]:
        if stale in model.peft_config:
            model.delete_adapter(stale)

    ranks = []
    for i, (name, state) in enumerate(zip(names, states)):
        rank = _state_rank(state, i)
        ranks.append(rank)
        model.add_adapter(name, replace(template, r=rank, inference_mode=False))
        _load_as(model, state, name, i)

    max_rank = min(
        min(m.in_features, m.out_features)
        for m in model.modules()
        if isinstance(m, LoraLayer) and names[0] in m.lora_A
    )
    rank = sum(ranks) if svd_rank is None else int(svd_rank)
    if rank < 1 and rule.exact != "cat":
        raise ValueError(f"svd_rank must be >= 1, got {svd_rank}")
    if rule.exact is None:
        _merge_dense(model, rule, names, weights, density, min(rank, max_rank), template, adapter_name)
    else:
        kwargs: dict = {}
        if rule.exact == "ties_svd":
            n = len(weights)
            weights = [w * n for w in weights]
            kwargs = dict(density=density, svd_rank=min(rank, max_rank), svd_full_matrices=False)
        model.add_weighted_adapter(
            adapters=names,
            weights=[float(w) for w in weights],
            adapter_name=adapter_name,
            combination_type=rule.exact,
            **kwargs,
        )
    model.set_adapter(adapter_name)
    for name in names:
        model.delete_adapter(name)
    return model


def _merge_dense(model: PeftModel, rule: MergeRule, names: list[str], weights: list[float], density: float,
                 rank: int, template, adapter_name: str) -> None:
    """A rule without a low-rank form: `rule.combine` on each module's dense ``dW_i``, then
    the best rank-`rank` approximation (truncated SVD) as adapter `adapter_name`
    (``r = lora_alpha = rank``: scaling 1, so ``B @ A`` is the merged ``dW``)."""
    deltas = [lora_deltas(model, name) for name in names]
    accepts = inspect.signature(rule.combine).parameters
    options = {"density": density} if "density" in accepts or any(
        p.kind == p.VAR_KEYWORD for p in accepts.values()) else {}
    model.add_adapter(adapter_name, replace(template, r=rank, lora_alpha=rank, inference_mode=False))
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if not (isinstance(module, LoraLayer) and adapter_name in module.lora_A):
                continue
            tensors = [d[module_name].double() for d in deltas]
            merged = rule.combine(tensors, torch.tensor(weights, dtype=torch.float64), **options)
            if not isinstance(merged, torch.Tensor) or merged.shape != tensors[0].shape:
                raise ValueError(f"merge rule '{rule.name}' returned {getattr(merged, 'shape', type(merged))} "
                                 f"for {module_name}, expected a tensor of shape {tuple(tensors[0].shape)}")
            u, sv, vh = torch.linalg.svd(merged, full_matrices=False)
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            b.copy_((u[:, :rank] * sv[:rank]).to(b.dtype))
            a.copy_(vh[:rank].to(a.dtype))
