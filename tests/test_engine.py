"""The batched engine against a naive per-sample autograd reference (tiny random Llama)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Enc, make_samples, random_checkpoints, tiny_lora_model

from clues_fl.scoring.alignment import ScoreSettings, anchor_scores, mean_gradient, score_samples
from clues_fl.model.loading import lora_parameters
from clues_fl.model.forward import collate, length_buckets, sample_losses
from clues_fl.model.loading import first_lora_layer, lora_state
from clues_fl.model.prefix_cache import PrefixCache


def naive_grad(model, sample: Enc) -> torch.Tensor:
    """Batch of one, the full HF forward, full-vocabulary logits: the reference."""
    params = lora_parameters(model)
    ids = torch.as_tensor(np.asarray(sample.input_ids, dtype=np.int64), device=next(iter(params.values())).device)[None]
    logits = model(input_ids=ids).logits[0]
    targets = ids[0, sample.prompt_len :]
    loss = F.cross_entropy(logits[sample.prompt_len - 1 : -1], targets)
    grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads]).double().cpu()


def flat(state: dict, names) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1) for n in names]).double()


def rel_close(a, b, tol=1e-5):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.allclose(a, b, rtol=tol, atol=tol * np.abs(b).max()), (a, b)


@pytest.fixture(scope="module")
def setup():
    model = tiny_lora_model(seed=3)
    samples = make_samples(11)
    names = list(lora_parameters(model))
    ckpts, refs = random_checkpoints(model)
    return model, samples, names, ckpts, refs


def naive_similarity(g, ref, ckpt, names, similarity, preconditioner) -> float:
    """eta_k * sim(P_k g, ref) written out on flat vectors."""
    from clues_fl.scoring.alignment import precondition

    if preconditioner == "adam":
        g = precondition(g, flat(ckpt.adam.m, names), flat(ckpt.adam.v, names), ckpt.adam)
    val = float(g @ ref)
    if similarity == "cosine":
        val /= float(g.norm() * ref.norm())
    return ckpt.lr * val


def naive_scores(model, samples, names, ckpts, refs, similarity, preconditioner):
    from clues_fl.model.loading import load_lora_state

    total = np.zeros(len(samples))
    for ckpt, ref in zip(ckpts, refs):
        load_lora_state(model, ckpt.state)
        r = flat(ref, names)
        for i, s in enumerate(samples):
            total[i] += naive_similarity(naive_grad(model, s), r, ckpt, names, similarity, preconditioner)
    return total


def tokens_bytes(samples, share: float, per_token: int = 32 * 8) -> int:
    """A cache budget of about `share` of these samples' prefix states (hidden 32, float64)."""
    return int(share * sum(len(s.input_ids) for s in samples) * per_token)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("preconditioner", ["sgd", "adam"])
@pytest.mark.parametrize("use_cache", [False, "all", "part", "none-fits"])
def test_scores_match_naive_reference(setup, similarity, preconditioner, use_cache, tmp_path):
    """With no cache, a whole cache, a cache over its budget (the shortest samples
    cached, the others' prefix recomputed, in batches that mix both) and a budget that
    fits nothing."""
    model, samples, names, ckpts, refs = setup
    first = first_lora_layer(model)
    budget = {"all": None, "part": tokens_bytes(samples, 0.4), "none-fits": 0}.get(use_cache)
    cache = (
        PrefixCache.build(model, samples, first, pad_id=0, batch_size=4, cache_dir=tmp_path, budget=budget)
        if use_cache
        else None
    )
    if use_cache == "part":
        assert 0 < cache.cached < len(samples)
    settings = ScoreSettings(similarity=similarity, preconditioner=preconditioner, batch_size=4)
    got = score_samples(model, samples, ckpts, refs, first, settings, pad_id=0, cache=cache)
    want = naive_scores(model, samples, names, ckpts, refs, similarity, preconditioner)
    rel_close(got.scores, want)
    assert got.ids == [s.id for s in samples]


def test_batched_loss_is_per_sample_mean_and_padding_free(setup):
    model, samples, *_ = setup
    first = first_lora_layer(model)
    batch = collate(samples, list(range(len(samples))), pad_id=0)
    losses = sample_losses(model, batch, first)
    for i, s in enumerate(samples):
        ids = torch.tensor([s.input_ids])
        logits = model(input_ids=ids).logits[0]
        ref = F.cross_entropy(logits[s.prompt_len - 1 : -1], ids[0, s.prompt_len :])
        assert abs(float(losses[i]) - float(ref)) < 1e-7 * abs(float(ref))


def test_anchor_loo_scores_match_naive(setup):
    model, samples, names, ckpts, _ = setup
    anchors = samples[:6]
    first = first_lora_layer(model)
    from clues_fl.model.loading import load_lora_state

    for preconditioner in ("sgd", "adam"):
        for similarity in ("dot", "cosine"):
            settings = ScoreSettings(similarity=similarity, preconditioner=preconditioner, batch_size=4)
            got = anchor_scores(model, anchors, ckpts, first, settings, pad_id=0)
            want = np.zeros(len(anchors))
            for k, ckpt in enumerate(ckpts):
                load_lora_state(model, ckpt.state)
                grads = torch.stack([naive_grad(model, a) for a in anchors])
                rel_close(flat(got.gradients[k], names), grads.mean(0))
                for a in range(len(anchors)):
                    others = torch.cat([grads[:a], grads[a + 1 :]]).mean(0)
                    want[a] += naive_similarity(grads[a], others, ckpt, names, similarity, preconditioner)
            rel_close(got.scores, want)


def test_mean_gradient_equals_naive_mean(setup):
    model, samples, names, ckpts, _ = setup
    from clues_fl.model.loading import load_lora_state

    load_lora_state(model, ckpts[0].state)
    first = first_lora_layer(model)
    got = mean_gradient(model, samples, first, pad_id=0, batch_size=3)
    want = torch.stack([naive_grad(model, s) for s in samples]).mean(0)
    rel_close(flat(got, names), want)


def test_length_buckets_cover_every_row_once():
    samples = make_samples(23, seed=1)
    rows = sorted(r for b in length_buckets(samples, 4) for r in b)
    assert rows == list(range(23))


def test_prefix_cache_is_keyed_by_tokens(setup, tmp_path):
    model, samples, *_ = setup
    first = first_lora_layer(model)
    a = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path)
    changed = [Enc(s.id, s.input_ids[:-1] + [5], s.prompt_len) for s in samples]
    b = PrefixCache.build(model, changed, first, pad_id=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert not np.array_equal(np.asarray(a.array), np.asarray(b.array))


def test_training_from_prefix_cache_gives_the_same_adapter(tmp_path):
    from clues_fl.model.training import TrainSettings, train_lora

    samples = make_samples(10, seed=4)
    settings = TrainSettings(lr=1e-2, epochs=2, batch_size=4, seed=0)
    states, losses = [], []
    for use_cache in (False, True):
        model = tiny_lora_model(seed=5)
        first = first_lora_layer(model)
        cache = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path) if use_cache else None
        result = train_lora(model, samples, settings, first, pad_id=0, cache=cache, num_checkpoints=2)
        assert len(result.checkpoints) == 2 and result.checkpoints[-1].adam is not None
        states.append(lora_state(model))
        losses.append(result.step_losses)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-8)
    before = lora_state(tiny_lora_model(seed=5))
    for name in states[0]:
        diff = (states[0][name] - states[1][name]).abs().max().item()
        # Adam's first steps are sign-like, so 1e-10 rounding differences of the prefix
        # (computed in other batch shapes) show up ~1e3 larger at near-zero gradients.
        assert diff < 1e-6 * states[0][name].abs().max().item(), (name, diff)
        assert not torch.equal(states[0][name], before[name])  # training moved every tensor


def test_settings_from_the_run_config_sections():
    """Training, scoring and LoRA settings are read from their own run-config sections."""
    from clues_fl.config import parse_config
    from clues_fl.model.loading import LoraSettings
    from clues_fl.runtime import lora_settings, score_settings, train_settings
    from clues_fl.model.training import TrainSettings

    cfg = parse_config({"train.lr": 1e-3, "train.batch-size": 4, "train.local-epochs": 2.0, "seed": 7,
                        "scoring.similarity": "dot", "scoring.batch-size": 3, "lora.r": 4,
                        "lora.layers": "top2", "lora.target-modules": "q_proj, k_proj"})
    assert TrainSettings.from_section(cfg.train, seed=7) == TrainSettings(lr=1e-3, epochs=2.0, batch_size=4, seed=7)
    assert train_settings(cfg, epochs=3, seed_offset=1) == TrainSettings(lr=1e-3, epochs=3, batch_size=4, seed=8)
    assert ScoreSettings.from_section(cfg.scoring) == score_settings(cfg) == ScoreSettings("dot", "sgd", 3)
    assert LoraSettings.from_section(cfg.lora, 10) == lora_settings(cfg, 10) == LoraSettings(4, 16, 0.0, ("q_proj", "k_proj"), (8, 9))


def test_partial_and_missing_caches_give_the_scores_of_a_whole_one(setup, tmp_path):
    """Scores and losses with the cache over its budget (batches mixing cached and
    recomputed rows), with a budget that fits nothing and with no cache are the whole
    cache's bit for bit (the cache built in the scoring batches: this tiny model's
    prefix rounds differently, ~1e-9, in batches of other widths)."""
    model, samples, names, ckpts, refs = setup
    first = first_lora_layer(model)
    settings = ScoreSettings(similarity="cosine", preconditioner="adam", batch_size=4)
    results = {}
    for name, budget in (("none", False), ("all", None), ("part", tokens_bytes(samples, 0.5)), ("zero", 0)):
        cache = None if budget is False else PrefixCache.build(model, samples, first, pad_id=0, batch_size=4,
                                                               cache_dir=tmp_path / name, budget=budget)
        results[name] = score_samples(model, samples, ckpts, refs, first, settings, pad_id=0, cache=cache)
    for name in ("none", "part", "zero"):
        np.testing.assert_array_equal(results[name].scores, results["all"].scores)
        np.testing.assert_array_equal(results[name].losses, results["all"].losses)


def test_training_from_a_cache_over_its_budget_gives_the_same_adapter(tmp_path):
    from clues_fl.model.training import TrainSettings, train_lora

    samples = make_samples(10, seed=4)
    settings = TrainSettings(lr=1e-2, epochs=2, batch_size=3, seed=0)
    states = []
    for budget in (None, tokens_bytes(samples, 0.5)):
        model = tiny_lora_model(seed=5)
        first = first_lora_layer(model)
        cache = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path / str(budget), budget=budget)
        train_lora(model, samples[1:], settings, first, pad_id=0, cache=cache.subset(range(1, 10)))
        states.append(lora_state(model))
    for name in states[0]:
        diff = (states[0][name] - states[1][name]).abs().max().item()
        assert diff < 1e-6 * states[0][name].abs().max().item(), (name, diff)


def test_cache_size_is_estimated_and_held_to_its_budget(setup, tmp_path, caplog, monkeypatch):
    """tokens x hidden x bytes; over the budget the shortest samples that fit are cached
    (one warning line, with the time it costs); a share is of the folder's free disk."""
    import logging
    import shutil

    from clues_fl.model import prefix_cache as pc

    model, samples, *_ = setup
    first = first_lora_layer(model)
    tokens = sum(len(s.input_ids) for s in samples)
    assert pc.estimate_bytes(model, samples) == tokens * 32 * 8  # float64 model: 8 bytes
    whole = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path / "whole")
    assert whole.cached == len(samples) and whole.array.nbytes == tokens * 32 * 8

    budget = tokens_bytes(samples, 0.45)
    with caplog.at_level(logging.INFO, logger="clues_fl.model.prefix_cache"):
        part = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path / "part", budget=budget)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "part").glob("*.npy"))
    assert part.array.nbytes <= budget < part.array.nbytes + 20 * 32 * 8  # the next sample would not fit
    assert on_disk < budget + 128  # + the .npy header
    shortest = sorted(len(s.input_ids) for s in samples)[: part.cached]
    assert sorted(int(part.lengths[r]) for r in np.flatnonzero(part.offsets >= 0)) == shortest
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "over the budget" in warnings[0].getMessage() and " s a pass" in warnings[0].getMessage()
    assert f"{len(samples) - part.cached} recompute" in warnings[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clues_fl.model.prefix_cache"):
        PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path / "zero", budget="0GB")
    assert not list((tmp_path / "zero").glob("*.npy"))
    assert "0 of them cached" in [r for r in caplog.records if r.levelno == logging.WARNING][0].getMessage()

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pc.shutil, "disk_usage", lambda path: usage._replace(free=2 * budget))
    shared = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path / "share", budget="0.5")
    assert shared.cached == part.cached  # half of twice the budget


def test_a_cache_is_reused_and_grows_with_its_budget(setup, tmp_path):
    model, samples, *_ = setup
    first = first_lora_layer(model)
    small = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path, budget=tokens_bytes(samples, 0.3))
    (path,) = tmp_path.glob("*.npy")
    stamp = path.stat().st_mtime_ns
    again = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path, budget=tokens_bytes(samples, 0.3))
    assert again.cached == small.cached and path.stat().st_mtime_ns == stamp  # read, not rebuilt
    larger = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path)
    assert larger.cached == len(samples) > small.cached and len(list(tmp_path.glob("*.npy"))) == 1
    batch = collate(samples, list(range(len(samples))), pad_id=0)
    # the same states; the tiny model's rotary embedding rounds differently (~1e-9) in
    # batches of other widths, and the recomputed rows come in narrower ones
    np.testing.assert_allclose(small.attach(collate(samples, list(range(len(samples))), pad_id=0)).hidden,
                               larger.attach(batch).hidden, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype,itemsize", [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)])
def test_cache_stores_the_models_precision_exactly(dtype, itemsize, tmp_path):
    """bf16 and fp16 states in 2 bytes, float32 in 4: the cached states are the frozen
    layers' own output, bit for bit."""
    from clues_fl.model.forward import prefix_hidden

    model = tiny_lora_model(seed=2).to(dtype)
    samples = make_samples(7, seed=2)
    first = first_lora_layer(model)
    cache = PrefixCache.build(model, samples, first, pad_id=0, batch_size=8, cache_dir=tmp_path)
    assert cache.array.itemsize == itemsize
    batch = collate(samples, list(range(7)), pad_id=0)
    want = prefix_hidden(model, batch, first)
    got = cache.attach(collate(samples, list(range(7)), pad_id=0)).hidden
    assert got.dtype == dtype
    valid = batch.attention_mask.bool()
    assert torch.equal(got[valid], want[valid])


def test_pages_read_from_the_cache_leave_the_resident_memory(tmp_path, monkeypatch):
    """The memory map's pages are handed back every RELEASE_BYTES: reading a whole
    cache, in order or in scattered small reads (each maps the pages around it too),
    leaves at most that much of it resident in the process."""
    import sys

    from clues_fl.model import prefix_cache as pc

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/smaps")
    path = tmp_path / "states.npy"
    np.save(path, np.ones((8192, 512), dtype=np.float32))  # 16 MiB
    monkeypatch.setattr(pc, "RELEASE_BYTES", 2**20)
    store = pc._Store(np.load(path, mmap_mode="r"))

    def resident_kib() -> int:
        lines = open("/proc/self/smaps").read().splitlines()
        for i, line in enumerate(lines):
            if line.endswith(str(path)):
                return next(int(x.split()[1]) for x in lines[i + 1 :] if x.startswith("Rss:"))
        return 0

    for start in range(0, 8192, 64):
        store.read(start, 64)
    assert resident_kib() <= 1024 + 128  # under one release's worth (+ the pages around the last read)
    for start in np.random.default_rng(0).integers(0, 8192 - 3, 2000):  # 6 kB here and there
        store.read(int(start), 3)
    assert resident_kib() <= 1024 + 128
