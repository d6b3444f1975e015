"""model.device / model.dtype, the prefix cache's device copy, bf16, gradient checkpointing
and the GPU-facing options, all on the CPU (tests/test_gpu.py runs on CUDA)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import make_samples, random_checkpoints, tiny_llama, tiny_lora_model

from clues_fl.model import device as dev
from clues_fl.config import ConfigError, parse_config
from clues_fl.scoring.alignment import ScoreSettings, anchor_scores, mean_gradient, score_samples
from clues_fl.model.forward import collate, final_hidden, sample_losses
from clues_fl.model.loading import LoraSettings, add_lora, check_quantization_available, first_lora_layer
from clues_fl.model.prefix_cache import PrefixCache


def test_config_keys_and_their_errors():
    cfg = parse_config({})
    assert (cfg["model.device"], cfg["model.dtype"], cfg["train.gradient-checkpointing"]) == ("auto", "auto", False)
    assert parse_config({"model.device": "cuda:1", "model.dtype": "bfloat16"})["model.device"] == "cuda:1"
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
        parse_config({"model.device": "gpu"})
    with pytest.raises(ConfigError, match="auto, float32, bfloat16, float16"):
        parse_config({"model.dtype": "fp8"})


def test_resolve():
    if not torch.cuda.is_available():
        assert dev.resolve("auto", "auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(ValueError, match="no CUDA device"):
            dev.resolve("cuda", "auto")
    assert dev.resolve("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="model.device"):
        dev.resolve("tpu")
    assert dev.peak_memory_mib() is None or torch.cuda.is_available()


def test_missing_bitsandbytes_names_the_install_command(monkeypatch):
    check_quantization_available("none")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'clues-fl\[quant\]'.*bitsandbytes==0.50.2"):
        check_quantization_available(parse_config({"model.quantization": "4bit"}))
    from clues_fl.federation.preflight import PreflightError, preflight

    with pytest.raises(PreflightError, match=r"^model.quantization: '4bit' needs bitsandbytes.*clues-fl\[quant\]"):
        preflight({"model.quantization": "4bit"})
    check_quantization_available(parse_config({}))  # none: no bitsandbytes needed


def test_gpus_per_site_lands_in_the_federation_config():
    import argparse

    from clues_fl.launch import _gpu_share, federation_config

    assert federation_config(3, 2, 0.5) == "num-supernodes=3 client-resources-num-cpus=2 client-resources-num-gpus=0.5"
    assert "num-gpus" not in federation_config(3, 2)
    with pytest.raises(argparse.ArgumentTypeError):
        _gpu_share("1.5")


def test_every_tensor_is_made_on_the_models_device(tmp_path):
    """With torch's default device set to 'meta', a tensor created without an explicit
    device cannot take part in a CPU computation: scoring runs only if the engine,
    the prefix cache and the baselines place each tensor they make (a CPU stand-in for
    the 'index is on cpu' errors a CUDA model raised)."""
    from clues_fl.scoring.baselines import datainf_scores, ppl_scores
    from clues_fl.scoring.quad import embed_samples, kfac_factors

    model = tiny_lora_model(seed=3)
    samples = make_samples(6)
    ckpts, refs = random_checkpoints(model)
    first = first_lora_layer(model)
    cache = PrefixCache.build(model, samples, first, pad_id=0, batch_size=4, cache_dir=tmp_path)
    torch.set_default_device("meta")
    try:
        for use_cache in (None, cache):
            for pre in ("sgd", "adam"):
                got = score_samples(model, samples, ckpts, refs, first, ScoreSettings("cosine", pre, 4), pad_id=0,
                                    cache=use_cache)
                assert np.isfinite(got.scores).all()
        assert np.isfinite(anchor_scores(model, samples, ckpts, first, ScoreSettings("dot", "adam", 4), pad_id=0,
                                         cache=cache).scores).all()
        grad = mean_gradient(model, samples, first, pad_id=0, cache=cache)
        assert np.isfinite(datainf_scores(model, samples, grad, first, pad_id=0, cache=cache)).all()
        assert np.isfinite(ppl_scores(model, samples, first, pad_id=0, cache=cache)).all()
        assert np.isfinite(embed_samples(model, samples, first, pad_id=0, cache=cache)).all()
        assert kfac_factors(model, samples, first, pad_id=0, cache=cache, eigen_correction=True)
    finally:
        torch.set_default_device(None)


def test_resident_cache_gives_the_same_batches(tmp_path):
    model = tiny_lora_model(seed=2)
    samples = make_samples(9, seed=3)
    first = first_lora_layer(model)
    cache = PrefixCache.build(model, samples, first, pad_id=0, batch_size=4, cache_dir=tmp_path)
    assert cache.resident is None  # on the CPU batches come from the memory map
    rows = [4, 1, 7]
    want = cache.attach(collate(samples, rows, 0)).hidden
    assert not cache.make_resident(budget_bytes=cache.nbytes - 1)
    assert cache.make_resident(budget_bytes=cache.nbytes) and cache.resident is not None
    assert torch.equal(cache.attach(collate(samples, rows, 0)).hidden, want)
    sub = cache.subset([2, 4, 6])
    assert sub.resident is cache.resident
    assert torch.equal(sub.attach(collate([samples[i] for i in (2, 4, 6)], [1], 0)).hidden, want[:1, : len(samples[4].input_ids)])


def _bf16_lora(seed: int = 0):
    base = tiny_llama(seed).to(torch.bfloat16)
    model = add_lora(base, LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"), layers=(2, 3)))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def test_bf16_model_keeps_lora_and_scores_float32_and_its_cache_exact(tmp_path):
    """A bf16 base: LoRA weights stay float32 (peft upcasts them), losses and scores are
    float32, the prefix cache stores the bf16 hidden states in 2 bytes and reproduces
    them exactly."""
    model = _bf16_lora()
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    samples = make_samples(8, seed=5)
    first = first_lora_layer(model)
    cache = PrefixCache.build(model, samples, first, pad_id=0, batch_size=4, cache_dir=tmp_path)
    assert cache.array.itemsize == 2 and cache.dtype == torch.bfloat16
    assert cache.array.nbytes == sum(len(s.input_ids) for s in samples) * 32 * 2  # tokens x hidden x 2
    batch = collate(samples, list(range(8)), 0)
    plain = final_hidden(model, batch, first)
    cached = final_hidden(model, cache.attach(collate(samples, list(range(8)), 0)), first)
    valid = batch.attention_mask.bool()
    assert torch.equal(plain[valid], cached[valid])
    assert sample_losses(model, batch, first).dtype == torch.float32
    ckpts, refs = random_checkpoints(model)
    ckpts = [type(c)({k: v.float() for k, v in c.state.items()}, c.lr, c.adam) for c in ckpts]
    got = score_samples(model, samples, ckpts, refs, first, ScoreSettings("cosine", "sgd", 4), pad_id=0, cache=cache)
    assert np.isfinite(got.scores).all()


def test_bf16_scores_agree_with_float32_scores():
    """The same weights in bf16 and float32 rank samples alike (Spearman, dot and cosine)."""
    from scipy.stats import spearmanr

    samples = make_samples(24, seed=6)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _bf16_lora(seed=1).to(dtype)  # the same (bf16-rounded) weights in both
        first = first_lora_layer(model)
        ckpts, refs = random_checkpoints(model, k=1)
        ckpts = [type(c)({k: v.float() for k, v in c.state.items()}, c.lr, c.adam) for c in ckpts]
        refs = [{k: v.float() for k, v in r.items()} for r in refs]
        for sim in ("dot", "cosine"):
            results[dtype, sim] = score_samples(model, samples, ckpts, refs, first, ScoreSettings(sim, "sgd", 8),
                                                pad_id=0).scores
    for sim in ("dot", "cosine"):
        rho = spearmanr(results[torch.float32, sim], results[torch.bfloat16, sim]).statistic
        assert rho > 0.95, (sim, rho)


def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, tmp_path):
    """train.gradient-checkpointing recomputes activations (non-reentrant, so also from
    the prefix cache, whose states need no grad): same losses, same adapter."""
    from clues_fl.model.loading import load_base_model, lora_state
    from clues_fl.model.training import TrainSettings, train_lora

    samples = make_samples(8, seed=4)
    states, losses = [], []
    for checkpointing in (False, True):
        base = load_base_model(tiny_model_dir, device="cpu", dtype="float32", gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = add_lora(base, LoraSettings(r=4, alpha=8, layers=(2, 3)))
        first = first_lora_layer(model)
        cache = PrefixCache.build(model, samples, first, pad_id=0, cache_dir=tmp_path)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        result = train_lora(model, samples, TrainSettings(lr=1e-2, epochs=2, batch_size=4), first, pad_id=0,
                            cache=cache)
        assert all(getattr(layer, "gradient_checkpointing", False) == checkpointing
                   for layer in base.model.layers)
        states.append(lora_state(model))
        losses.append(result.step_losses)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    for name in states[0]:
        assert torch.allclose(states[0][name], states[1][name], rtol=1e-5, atol=1e-7), name
