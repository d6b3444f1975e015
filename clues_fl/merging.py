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
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

MERGE_METHODS = ("linear", "weighted", "ties")

_STATE_ADAPTER = "default"  # adapter name inside lora_state() keys
_LORA_KEY = re.compile(r"\.(lora_[AB])\.([^.]+)\.")


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
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{method}': expected one of {', '.join(MERGE_METHODS)}")
    n = len(kept_counts)
    if n == 0:
        raise ValueError("merge_weights needs at least one client")
    if len(mean_scores) != n:
        raise ValueError(f"{n} kept_counts but {len(mean_scores)} mean_scores")
    if method in ("linear", "ties"):
        return [1.0 / n] * n
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{method}': expected one of {', '.join(MERGE_METHODS)}")
    if not states:
        raise ValueError("merge_adapters needs at least one client state")
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"non-finite merge weight: {weights}")
    if method == "ties" and not 0.0 < density <= 1.0:
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

    kwargs: dict = {}
    if method == "ties":
        combination = "ties_svd"
        n = len(weights)
        weights = [w * n for w in weights]
        max_rank = min(
            min(m.in_features, m.out_features)
            for m in model.modules()
            if isinstance(m, LoraLayer) and names[0] in m.lora_A
        )
        rank = sum(ranks) if svd_rank is None else int(svd_rank)
        if rank < 1:
            raise ValueError(f"svd_rank must be >= 1, got {svd_rank}")
        kwargs = dict(density=density, svd_rank=min(rank, max_rank), svd_full_matrices=False)
    else:
        combination = "cat"
    model.add_weighted_adapter(
        adapters=names,
        weights=[float(w) for w in weights],
        adapter_name=adapter_name,
        combination_type=combination,
        **kwargs,
    )
    model.set_adapter(adapter_name)
    for name in names:
        model.delete_adapter(name)
    return model
