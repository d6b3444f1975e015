"""Baseline scorers against hand computations and naive per-sample autograd (tiny random Llama)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Enc, make_samples, random_checkpoints, tiny_llama, tiny_lora_model

from clues_fl.scoring import baselines
from clues_fl.scoring.baselines import (
    datainf_inverse_hvp,
    datainf_lambda,
    datainf_scores,
    ifd_scores,
    ifd_values,
    less_scores,
    ppl_scores,
    random_scores,
    select_top,
)
from clues_fl.scoring.alignment import ScoreSettings, mean_gradient, score_samples
from clues_fl.model.loading import lora_parameters
from clues_fl.model.loading import (
    LoraSettings,
    add_lora,
    first_lora_layer,
    load_lora_state,
    lora_state,
)
from clues_fl.model.prefix_cache import PrefixCache


def answer_only(samples: list[Enc], header=(7, 8)) -> list[Enc]:
    return [Enc(s.id, list(header) + s.input_ids[s.prompt_len :], len(header)) for s in samples]


def hf_loss(model, sample: Enc) -> torch.Tensor:
    """HF's own loss: labels = -100 on the prompt, shifted inside the model."""
    ids = torch.tensor([sample.input_ids])
    labels = ids.clone()
    labels[0, : sample.prompt_len] = -100
    return model(input_ids=ids, labels=labels).loss


def naive_grads(model, sample: Enc) -> dict[str, torch.Tensor]:
    params = lora_parameters(model)
    ids = torch.tensor([sample.input_ids])
    logits = model(input_ids=ids).logits[0]
    loss = F.cross_entropy(logits[sample.prompt_len - 1 : -1], ids[0, sample.prompt_len :])
    return {n: g.double() for n, g in zip(params, torch.autograd.grad(loss, list(params.values())))}


@pytest.fixture(scope="module")
def setup(one_thread):
    model = tiny_lora_model(seed=3)
    samples = make_samples(9)
    anchors = make_samples(4, seed=11)
    first = first_lora_layer(model)
    anchor_grad = mean_gradient(model, anchors, first, pad_id=0, batch_size=4)
    ckpts, refs = random_checkpoints(model)
    return model, samples, anchor_grad, ckpts, refs


def run_scorer(name, setup, batch_size, cache=None):
    model, samples, anchor_grad, ckpts, refs = setup
    first = first_lora_layer(model)
    initial = lora_state(model)
    if name == "ppl":
        return ppl_scores(model, samples, first, pad_id=0, batch_size=batch_size, cache=cache)
    if name == "ifd":
        return ifd_scores(model, samples, answer_only(samples), first, pad_id=0, batch_size=batch_size, cache=cache)
    if name == "datainf":
        return datainf_scores(model, samples, anchor_grad, first, pad_id=0, batch_size=batch_size, cache=cache)
    if name == "less":
        try:
            return less_scores(model, samples, ckpts, refs, first, pad_id=0, batch_size=batch_size, cache=cache)
        finally:
            load_lora_state(model, initial)  # score_samples loads checkpoints into the shared model
    if name == "random":
        return random_scores(len(samples), seed=5)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["ppl", "ifd", "datainf", "less", "random"])
def test_scores_finite_shaped_and_batching_invariant(setup, name):
    one = run_scorer(name, setup, 1)
    four = run_scorer(name, setup, 4)
    assert one.shape == (len(setup[1]),) and one.dtype == np.float64
    assert np.isfinite(one).all()
    # LlamaRMSNorm and eager softmax run in float32 even in a float64 model, so padded
    # rows differ ~1e-7 between batch shapes; DataInf's small damping amplifies that.
    tol = 1e-4 if name == "datainf" else 1e-6
    np.testing.assert_allclose(one, four, rtol=tol, atol=tol * np.abs(one).max())
    assert np.unique(one).size == one.size  # samples are told apart


def test_prefix_cache_gives_the_same_scores(setup, tmp_path):
    model, samples, *_ = setup
    cache = PrefixCache.build(model, samples, first_lora_layer(model), pad_id=0, batch_size=4, cache_dir=tmp_path)
    for name in ("ppl", "datainf"):
        np.testing.assert_allclose(run_scorer(name, setup, 4, cache), run_scorer(name, setup, 4), rtol=1e-6)


def test_ppl_matches_hf_loss(setup):
    model, samples, *_ = setup
    got = ppl_scores(model, samples, first_lora_layer(model), pad_id=0, batch_size=4)
    with torch.no_grad():
        want = np.array([-float(hf_loss(model, s)) for s in samples])
    # HF's loss upcasts the logits to float32, so agreement is float32-deep.
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ppl_on_a_plain_model():
    model = tiny_llama(seed=2)
    samples = make_samples(5, seed=3)
    got = ppl_scores(model, samples, 0, pad_id=0, batch_size=2)
    with torch.no_grad():
        want = np.array([-float(hf_loss(model, s)) for s in samples])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ifd_matches_hand_ratio(setup):
    model, samples, *_ = setup
    alone = answer_only(samples)
    got = ifd_values(model, samples, alone, first_lora_layer(model), pad_id=0, batch_size=4)
    with torch.no_grad():
        want = np.array([float(hf_loss(model, q) / hf_loss(model, a)) for q, a in zip(samples, alone)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ifd_score_ranks_unhelpful_questions_last(setup, monkeypatch):
    ifd = np.array([0.5, 0.9, 1.0, 1.2, 3.0])
    monkeypatch.setattr(baselines, "ifd_values", lambda *a, **k: ifd)
    scores = ifd_scores(None, [], [], 0, pad_id=0)
    assert list(np.argsort(-scores)) == [2, 1, 0, 3, 4]


def test_ifd_rejects_misaligned_encodings(setup):
    model, samples, *_ = setup
    with pytest.raises(ValueError, match="order"):
        ifd_values(model, samples, answer_only(samples[::-1]), first_lora_layer(model), pad_id=0)


def test_encode_answer_only_keeps_the_answer_tokens():
    from clues_fl.data.sources import Sample, encode_samples
    from clues_fl.model.loading import load_tokenizer

    tok = load_tokenizer()
    samples = [Sample("a", "What is two plus two?", "Four."), Sample("b", "word " * 200, "A long answer " * 30)]
    full = encode_samples(tok, samples, 64)
    alone = baselines.encode_answer_only(tok, full)
    assert full[1].truncated and alone[1].truncated
    header = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    for f, a in zip(full, alone):
        assert a.input_ids[a.prompt_len :] == f.input_ids[f.prompt_len :].tolist()
        assert tok.decode(a.input_ids[: a.prompt_len]) == header
        assert len(a.input_ids) <= 64


def test_datainf_inverse_hvp_is_the_exact_damped_inverse():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    v = torch.randn(9, generator=gen, dtype=torch.float64)
    lam = datainf_lambda(float((g * g).sum()), 6, 9)
    exact = torch.stack(
        [torch.linalg.solve(torch.outer(gi, gi) + lam * torch.eye(9, dtype=torch.float64), v) for gi in g]
    ).mean(0)
    got = datainf_inverse_hvp(g, v, lam)
    assert torch.allclose(got, exact, rtol=1e-8, atol=1e-8 * float(exact.abs().max()))


def test_datainf_lambda_follows_datainf_code():
    g = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    code = float(torch.stack([torch.mean(gi**2) for gi in g]).mean() / 10)  # DataInf's lambda_const
    assert datainf_lambda(float((g * g).sum()), 3, 4) == pytest.approx(code, rel=1e-12)
    assert datainf_lambda(float((g * g).sum()), 3, 4, per_element=False) == pytest.approx(4 * code, rel=1e-12)


def naive_datainf(model, samples, anchor_grad, damping=0.1, per_element=True) -> np.ndarray:
    """All per-sample gradients in memory, the inverse by torch.linalg.solve per sample."""
    grads = [naive_grads(model, s) for s in samples]
    n = len(samples)
    scores = np.zeros(n)
    for name in grads[0]:
        g = torch.stack([gr[name].reshape(-1) for gr in grads])
        d = g.shape[1]
        mean_sq = float((g * g).sum(1).mean())
        lam = damping * (mean_sq / d if per_element else mean_sq)
        if lam == 0:
            continue
        v = anchor_grad[name].double().reshape(-1)
        eye = torch.eye(d, dtype=torch.float64)
        hvp = torch.stack([torch.linalg.solve(torch.outer(gi, gi) + lam * eye, v) for gi in g]).mean(0)
        scores += (g @ hvp).numpy()
    return scores


@pytest.mark.parametrize("per_element", [True, False])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_datainf_streaming_matches_naive(setup, per_element, batch_size):
    model, samples, anchor_grad, *_ = setup
    got = datainf_scores(model, samples, anchor_grad, first_lora_layer(model), pad_id=0, batch_size=batch_size,
                         per_element=per_element)
    want = naive_datainf(model, samples, anchor_grad, per_element=per_element)
    # Batches of one have the naive reference's shapes; padded batches carry the model's
    # float32 RMSNorm/softmax rounding (~1e-7), which DataInf's small damping amplifies.
    tol = 1e-8 if batch_size == 1 else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_datainf_at_lora_initialisation_skips_zero_gradient_layers():
    torch.manual_seed(0)
    model = add_lora(tiny_llama(seed=4), LoraSettings(r=4, alpha=8, layers=(2, 3)))  # lora_B = 0
    samples = make_samples(5, seed=8)
    first = first_lora_layer(model)
    anchor = mean_gradient(model, make_samples(3, seed=9), first, pad_id=0)
    got = datainf_scores(model, samples, anchor, first, pad_id=0, batch_size=1)
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_allclose(got, naive_datainf(model, samples, anchor), rtol=1e-8)


def test_less_is_engine_cosine_adam(setup):
    model, samples, _, ckpts, refs = setup
    initial = lora_state(model)
    first = first_lora_layer(model)
    got = less_scores(model, samples, ckpts, refs, first, pad_id=0, batch_size=3)
    settings = ScoreSettings(similarity="cosine", preconditioner="adam", batch_size=3)
    want = score_samples(model, samples, ckpts, refs, first, settings, pad_id=0).scores
    load_lora_state(model, initial)
    np.testing.assert_array_equal(got, want)


def test_random_scores_and_select_top():
    a, b = random_scores(50, seed=1), random_scores(50, seed=1)
    assert a.shape == (50,) and np.array_equal(a, b) and not np.array_equal(a, random_scores(50, seed=2))
    assert ((a >= 0) & (a < 1)).all()
    keep = select_top(np.array([0.3, 0.9, 0.1, 0.9, 0.5]), 3)
    assert keep.tolist() == [False, True, False, True, True]
    assert select_top(a, 0).sum() == 0 and select_top(a, 99).all()


def test_registry_names_every_selection_method():
    from clues_fl.names import SELECTION_METHODS
    from clues_fl.scoring.scorers import BUILTIN

    assert set(BUILTIN) == set(SELECTION_METHODS) >= {"clues", "quad", "all", "oracle", "random", "ppl", "ifd",
                                                       "datainf", "less"}
