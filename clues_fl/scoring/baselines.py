"""Per-sample data-quality scorers that the CLUES paper compares against.

Every scorer returns a float64 numpy array of shape (N,), in the order of `encoded`,
finite, with **higher = better quality = keep**, so one selection step (a threshold or
a top-k) serves every method. Losses and gradients come from the same split forward
and hook engine as CLUES (response-only loss, each sample normalised by its own answer
length, optional prefix cache), so the baselines differ from CLUES only in the score.

The run-config key ``selection.method`` names a scorer of ``scorers.BUILTIN``; ``all`` and
``oracle`` have no scorer function (keep everything / keep exactly the known clean
samples), ``random`` keeps as many samples as CLUES kept, chosen at random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from clues_fl.console import progress as tqdm

from clues_fl.data.sources import Encoded, Sample, encode_sample
from clues_fl.model.device import device_of, to_host
from clues_fl.scoring.alignment import ScoreSettings, per_sample_gradients, score_batch, score_samples
from clues_fl.model.training import Checkpoint
from clues_fl.model.forward import iterate_batches
from clues_fl.model.loading import lora_linears
from clues_fl.model.forward import sample_losses



def _finite(scores: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(scores).all():
        raise FloatingPointError(f"{what}: non-finite scores for rows {np.flatnonzero(~np.isfinite(scores))[:5]}")
    return scores


@torch.no_grad()
def answer_losses_of(model, encoded: Sequence, first_layer: int, *, pad_id: int, batch_size: int = 8,
                     cache=None, desc: str = "losses") -> np.ndarray:
    """(N,) mean answer-token loss of each sample, in input order (batching-invariant)."""
    out = np.zeros(len(encoded))
    batches = (len(encoded) + batch_size - 1) // batch_size
    for batch in tqdm(iterate_batches(encoded, batch_size, pad_id, cache, device_of(model)), total=batches,
                      desc=desc, leave=False, disable=batches < 4):
        out[batch.rows] = to_host(sample_losses(model, batch, first_layer))
    return out


# --------------------------------------------------------------------------- PPL


def ppl_scores(model, encoded: Sequence, first_layer: int, *, pad_id: int, batch_size: int = 8,
               cache=None) -> np.ndarray:
    """Perplexity filter: score = -mean answer-token loss = -log perplexity.

    Works with a plain model too (`first_layer=0`). Low perplexity is kept.
    """
    losses = answer_losses_of(model, encoded, first_layer, pad_id=pad_id, batch_size=batch_size,
                              cache=cache, desc="ppl")
    return _finite(-losses, "ppl_scores")


# --------------------------------------------------------------------------- IFD


def empty_turn_header(tokenizer, system_prompt: str | None = None) -> list[int]:
    """The token ids of the chat header around an EMPTY user turn (plain tokenizers:
    ``"Question: \\nAnswer: "``): the only context of an answer scored alone. The prompt
    is tokenised apart from the answer (encode_sample), so it is the same for every answer."""
    probe = encode_sample(tokenizer, Sample("_", "", "."), 10**9, system_prompt)
    return list(probe.input_ids[: probe.prompt_len])


class AnswerOnly(Sequence):
    """`encoded`'s answers after `header`, each made when it is read: a pass over a large
    pool holds its batch's encodings, not a second copy of the pool's."""

    def __init__(self, encoded: Sequence[Encoded], header: list[int]):
        self.encoded, self.header = encoded, list(header)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        e = self.encoded[i]
        return Encoded(e.id, self.header + list(map(int, e.input_ids[e.prompt_len :])), len(self.header), e.truncated)


def encode_answer_only(tokenizer, encoded: Sequence[Encoded], system_prompt: str | None = None) -> AnswerOnly:
    """The answers alone, for IFD's denominator loss(answer): each encoding's answer
    tokens after empty_turn_header, so numerator and denominator average the loss over
    exactly the same tokens, also for truncated samples.
    The IFD paper conditions on nothing at all; with a chat model the bare header is
    the nearest "no instruction" context and it lets the first answer token be scored.
    """
    return AnswerOnly(encoded, empty_turn_header(tokenizer, system_prompt))


def ifd_values(model, encoded_with_question: Sequence, encoded_answer_only: Sequence, first_layer: int, *,
               pad_id: int, batch_size: int = 8, cache=None, answer_cache=None) -> np.ndarray:
    """Raw IFD = loss(answer | question) / loss(answer alone), per sample.

    `cache` / `answer_cache` are prefix caches built on the respective encodings.
    """
    if len(encoded_with_question) != len(encoded_answer_only):
        raise ValueError("encoded_with_question and encoded_answer_only must have the same length")
    for a, b in zip(encoded_with_question, encoded_answer_only):
        if a.id != b.id:
            raise ValueError(f"sample order differs between the encodings: {a.id!r} vs {b.id!r}")
    cond = answer_losses_of(model, encoded_with_question, first_layer, pad_id=pad_id,
                            batch_size=batch_size, cache=cache, desc="ifd (question)")
    alone = answer_losses_of(model, encoded_answer_only, first_layer, pad_id=pad_id,
                             batch_size=batch_size, cache=answer_cache, desc="ifd (answer)")
    return cond / np.maximum(alone, 1e-12)


def ifd_scores(model, encoded_with_question: Sequence, encoded_answer_only: Sequence, first_layer: int, *,
               pad_id: int, batch_size: int = 8, cache=None, answer_cache=None) -> np.ndarray:
    """Instruction-Following Difficulty (Li et al. 2023) as a keep score.

    IFD selects the samples with the HIGHEST IFD (the question helps least, i.e. the
    instruction is hard) but discards IFD > 1 (the question does not help at all, the
    pair is likely misaligned). As one ordering: score = IFD if IFD <= 1 else -IFD,
    so every IFD > 1 sample ranks below every IFD <= 1 sample.
    """
    ifd = ifd_values(model, encoded_with_question, encoded_answer_only, first_layer, pad_id=pad_id,
                     batch_size=batch_size, cache=cache, answer_cache=answer_cache)
    return _finite(np.where(ifd <= 1.0, ifd, -ifd), "ifd_scores")


# --------------------------------------------------------------------------- DataInf


def datainf_lambda(sq_norm_sum: float, n: int, numel: int, damping: float = 0.1,
                   per_element: bool = True) -> float:
    """DataInf's layer-wise damping.

    DataInf's code (`lambda_const = mean_i mean(g_i**2) / 10`) uses the per-ELEMENT
    mean square: lambda_l = damping * sum_i ||g_i||^2 / (n * d_l). `per_element=False`
    gives damping * mean_i ||g_i||^2 instead (d_l times larger).
    """
    mean_sq = sq_norm_sum / max(n, 1)
    return damping * (mean_sq / numel if per_element else mean_sq)


def datainf_inverse_hvp(per_sample: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """DataInf's H_l^-1 v for one layer, from all per-sample gradients in memory.

    H_l^-1 ~ (1/n) sum_i (g_i g_i^T + lam I)^-1, and Sherman-Morrison gives each term
    exactly: (1/lam) (v - (g_i^T v) / (lam + ||g_i||^2) g_i). `per_sample` is (n, d).
    This is the reference the streaming `datainf_scores` reproduces.
    """
    g = per_sample.reshape(per_sample.shape[0], -1)
    v = v.reshape(-1).to(g.dtype)
    c = (g @ v) / (lam + (g * g).sum(1))
    return (v - (c[:, None] * g).mean(0)) / lam


def datainf_scores(model, encoded: Sequence, anchor_gradient: dict[str, torch.Tensor], first_layer: int, *,
                   pad_id: int, damping: float = 0.1, per_element: bool = True, batch_size: int = 8,
                   cache=None, desc: str = "datainf") -> np.ndarray:
    """DataInf (Kwon et al., ICLR 2024) on the LoRA weights at the model's current state.

    Influence of upweighting z on the anchor loss is I(z) = -sum_l v_l^T H_l^-1 g_l(z)
    (v = mean anchor gradient, l = each lora_A / lora_B weight, as in DataInf). We
    return score = -I(z) = sum_l v_l^T H_l^-1 g_l(z): positive means training on z
    lowers the anchor loss, so higher = keep.

    H_l^-1 v needs sums over every sample's gradient, but per-sample gradients are
    never all held at once: three batched passes, each with one per-batch backward:
      1. sum_i ||g_il||^2 per layer -> lambda_l (`datainf_lambda`);
      2. s_l = sum_i c_il g_il, c_il = (g_il^T v_l) / (lambda_l + ||g_il||^2)
         -> H_l^-1 v_l = (v_l - s_l / n) / lambda_l;
      3. g(z)^T H^-1 v for every z via the engine's dot-product path (no per-sample
         gradient formed), since g(z)^T s_l is only known once s_l is complete.
    A layer whose gradients are all zero (lora_A while lora_B = 0 at initialisation)
    contributes nothing and is skipped instead of dividing by lambda_l = 0.
    """
    n = len(encoded)
    if n == 0:
        return np.zeros(0)
    names = [name for name, _ in lora_linears(model)]
    missing = [nm for nm in names if nm not in anchor_gradient]
    if missing:
        raise ValueError(f"anchor_gradient lacks LoRA weights {missing[:3]}")
    batches = (n + batch_size - 1) // batch_size
    bar = tqdm(total=3 * batches, desc=desc, leave=False, disable=batches < 2)
    device = device_of(model)

    sq_sum = {nm: torch.zeros((), dtype=torch.float64, device=device) for nm in names}
    for batch in iterate_batches(encoded, batch_size, pad_id, cache, device):
        grads = per_sample_gradients(model, batch, first_layer)
        for nm in names:
            sq_sum[nm] += grads[nm].double().pow(2).sum()
        bar.update(1)
    lam = {nm: datainf_lambda(float(sq_sum[nm]), n, anchor_gradient[nm].numel(), damping, per_element)
           for nm in names}
    active = [nm for nm in names if lam[nm] > 0]

    v = {nm: anchor_gradient[nm].to(device, torch.float64).reshape(-1) for nm in active}
    weighted = {nm: torch.zeros_like(v[nm]) for nm in active}
    for batch in iterate_batches(encoded, batch_size, pad_id, cache, device):
        grads = per_sample_gradients(model, batch, first_layer)
        for nm in active:
            g = grads[nm].double().reshape(batch.size, -1)
            c = (g @ v[nm]) / (lam[nm] + (g * g).sum(1))
            weighted[nm] += c @ g
        bar.update(1)
    hvp = {}
    for nm in names:
        shape = anchor_gradient[nm].shape
        if nm in active:
            hvp[nm] = ((v[nm] - weighted[nm] / n) / lam[nm]).reshape(shape)
        else:
            hvp[nm] = torch.zeros(shape, dtype=torch.float64, device=device)

    scores = np.zeros(n)
    for batch in iterate_batches(encoded, batch_size, pad_id, cache, device):
        scores[batch.rows] = to_host(score_batch(model, batch, hvp, first_layer).dot)
        bar.update(1)
    bar.close()
    return _finite(scores, "datainf_scores")


# --------------------------------------------------------------------------- LESS


def less_scores(model, encoded: Sequence, checkpoints: list[Checkpoint],
                anchor_gradients: list[dict[str, torch.Tensor]], first_layer: int, *, pad_id: int,
                batch_size: int = 8, cache=None) -> np.ndarray:
    """LESS (Xia et al. 2024): sum_k eta_k cos(Gamma_k(z), G_k), Gamma = Adam direction.

    Exactly `engine.score_samples` with similarity="cosine", preconditioner="adam"
    (the checkpoints need Adam moments). One difference from LESS's code: LESS averages
    the cosine over the individual validation gradients, here the anchor side is the
    mean anchor gradient (the same reference CLUES uses). LESS keeps the top fraction.
    """
    settings = ScoreSettings(similarity="cosine", preconditioner="adam", batch_size=batch_size)
    result = score_samples(model, list(encoded), checkpoints, anchor_gradients, first_layer, settings,
                           pad_id=pad_id, cache=cache, desc="less")
    return _finite(np.asarray(result.scores, dtype=float), "less_scores")


# --------------------------------------------------------------------------- random, top-k


def random_scores(n: int, seed: int) -> np.ndarray:
    """Uniform [0, 1) scores; keep the top `count` (the count CLUES kept) for a random subset."""
    return np.random.default_rng(seed).random(n)


def select_top(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask keeping the `count` highest scores (ties broken by position)."""
    scores = np.asarray(scores, dtype=float)
    count = int(min(max(count, 0), scores.size))
    order = np.argsort(-scores, kind="stable")
    keep = np.zeros(scores.size, dtype=bool)
    keep[order[:count]] = True
    return keep
