"""Every supported model family, split forward and own-forward fallback, against the
model's own forward (batch of one, full logits) and the naive batch-1 autograd scores.

Tiny random configs built in code (hidden 64, 4 layers, float64). Sliding windows are
4 tokens and the samples 6-19 tokens long, so windows matter; Gemma 2/3 get a small
final logit soft-cap so it matters too; Gemma 3 mixes local and global layers (and
ropes) below and above the split at layer 2.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import make_samples, random_checkpoints

from clues_fl.model import families
from clues_fl.scoring.alignment import ScoreSettings, precondition, score_samples
from clues_fl.model.training import AdamMoments
from clues_fl.model.loading import lora_parameters
from clues_fl.model.forward import collate, final_hidden, sample_losses, splittable, use_own_forward
from clues_fl.model.loading import LoraSettings, ModelError, add_lora, first_lora_layer, load_lora_state
from clues_fl.model.prefix_cache import PrefixCache

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=True, attn_implementation="eager",
)
WINDOW = 4
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# family: (config class, extra config, LoRA target modules)
FAMILIES = {
    "llama": ("LlamaConfig", {}, ("q_proj", "v_proj")),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                        layer_types=MIXED, final_logit_softcapping=3.0), ("q_proj", "v_proj")),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                    layer_types=MIXED, final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
               ("q_proj", "v_proj")),
    "gemma": ("GemmaConfig", dict(head_dim=16), ("q_proj", "v_proj")),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
              ("q_proj", "v_proj")),
    "qwen3": ("Qwen3Config", dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
              ("q_proj", "v_proj")),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), ("q_proj", "v_proj")),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW), ("qkv_proj",)),
}
SPLIT_LAYER = 2  # LoRA on layers 2, 3: the prefix (0, 1) is frozen


def tiny(family: str, seed: int = 0, layers=(SPLIT_LAYER, 3), own_forward: bool = False):
    cls_name, extra, targets = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64)
    model.config.use_cache = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model = add_lora(model, LoraSettings(r=4, alpha=8, target_modules=targets, layers=layers))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    model.eval()
    if own_forward:
        use_own_forward(model)
    return model


def own_loss(model, sample) -> torch.Tensor:
    """The model's own forward, batch of one, full-vocabulary logits."""
    ids = torch.tensor([sample.input_ids])
    logits = model(input_ids=ids).logits[0]
    return F.cross_entropy(logits[sample.prompt_len - 1 : -1], ids[0, sample.prompt_len :])


def naive_gradients(model, samples, ckpts) -> list[torch.Tensor]:
    """(K, N, P) per-sample gradients, one autograd call per sample and checkpoint."""
    params = list(lora_parameters(model).values())
    out = []
    for ckpt in ckpts:
        load_lora_state(model, ckpt.state)
        rows = []
        for s in samples:
            grads = torch.autograd.grad(own_loss(model, s), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
        out.append(torch.stack(rows))
    return out


def flat(state, names) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1) for n in names]).double()


def naive_scores(grads, ckpts, refs, names, similarity, preconditioner) -> np.ndarray:
    total = np.zeros(grads[0].shape[0])
    for g_all, ckpt, ref in zip(grads, ckpts, refs):
        r = flat(ref, names)
        for i, g in enumerate(g_all):
            if preconditioner == "adam":
                g = precondition(g, flat(ckpt.adam.m, names), flat(ckpt.adam.v, names), ckpt.adam)
            val = float(g @ r)
            if similarity == "cosine":
                val /= float(g.norm() * r.norm())
            total[i] += ckpt.lr * val
    return total


def rel_close(a, b, tol=1e-6):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.allclose(a, b, rtol=tol, atol=tol * np.abs(b).max()), (a, b)


SAMPLES = make_samples(9, seed=2)  # 6-19 tokens: longer than the 4-token windows


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, one_thread):
    """(name, model, checkpoints, references, naive per-sample gradients)."""
    model = tiny(request.param)
    ckpts, refs = random_checkpoints(model, k=2)
    grads = naive_gradients(model, SAMPLES, ckpts)
    return request.param, model, ckpts, refs, grads


def test_every_family_is_split_and_some_layers_see_a_window(family):
    name, model, *_ = family
    assert splittable(model), name
    assert first_lora_layer(model) == SPLIT_LAYER
    assert max(len(s.input_ids) for s in SAMPLES) > WINDOW


def test_split_losses_equal_the_models_own_forward(family, tmp_path):
    name, model, ckpts, *_ = family
    load_lora_state(model, ckpts[0].state)
    want = torch.stack([own_loss(model, s) for s in SAMPLES]).detach()
    rows = list(range(len(SAMPLES)))
    for first in (0, 1, SPLIT_LAYER):  # split below, at and inside the LoRA layers' prefix
        got = sample_losses(model, collate(SAMPLES, rows, pad_id=0), first).detach()
        rel_close(got, want, 1e-7)
    cache = PrefixCache.build(model, SAMPLES, SPLIT_LAYER, pad_id=0, batch_size=4, cache_dir=tmp_path)
    batch = cache.attach(collate(SAMPLES, rows, pad_id=0))
    rel_close(sample_losses(model, batch, SPLIT_LAYER).detach(), want, 1e-7)


@pytest.mark.parametrize(
    "similarity,preconditioner,use_cache",
    [("dot", "sgd", False), ("cosine", "sgd", False), ("dot", "adam", False), ("cosine", "adam", False),
     ("cosine", "sgd", True), ("dot", "adam", True)],
)
def test_engine_scores_equal_naive_autograd(family, similarity, preconditioner, use_cache, tmp_path):
    name, model, ckpts, refs, grads = family
    first = first_lora_layer(model)
    cache = PrefixCache.build(model, SAMPLES, first, pad_id=0, batch_size=4, cache_dir=tmp_path) if use_cache else None
    settings = ScoreSettings(similarity=similarity, preconditioner=preconditioner, batch_size=4)
    got = score_samples(model, SAMPLES, ckpts, refs, first, settings, pad_id=0, cache=cache)
    names = list(lora_parameters(model))
    rel_close(got.scores, naive_scores(grads, ckpts, refs, names, similarity, preconditioner))


@pytest.mark.parametrize("name", ["llama", "gemma3", "phi3"])
def test_own_forward_fallback_is_exact(name, one_thread):
    model = tiny(name, seed=1, own_forward=True)
    assert not splittable(model)
    ckpts, refs = random_checkpoints(model, k=2)
    grads = naive_gradients(model, SAMPLES, ckpts)
    names = list(lora_parameters(model))
    first = first_lora_layer(model)
    for similarity, preconditioner in (("dot", "sgd"), ("cosine", "sgd"), ("cosine", "adam")):
        settings = ScoreSettings(similarity=similarity, preconditioner=preconditioner, batch_size=4)
        got = score_samples(model, SAMPLES, ckpts, refs, first, settings, pad_id=0)
        rel_close(got.scores, naive_scores(grads, ckpts, refs, names, similarity, preconditioner))
    # the final hidden states (Quad's embeddings) equal the split forward's
    split = tiny(name, seed=1)
    load_lora_state(split, ckpts[0].state)
    load_lora_state(model, ckpts[0].state)
    batch = collate(SAMPLES, [0, 1, 2], pad_id=0)
    real = batch.attention_mask.bool()
    rel_close(final_hidden(model, batch, first)[real].detach(), final_hidden(split, batch, first)[real].detach(), 1e-7)
    with pytest.raises(ValueError, match="own forward"):
        PrefixCache.build(model, SAMPLES, first, pad_id=0)


def test_unregistered_family_falls_back_with_one_log_line(caplog, one_thread):
    """GPT-2 (Conv1D layers under `transformer.h`) has no adapter: its own forward runs."""
    config = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).to(torch.float64).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    model = add_lora(base, LoraSettings(r=4, alpha=8, target_modules=("c_attn",), layers=(2, 3)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.eval()
    with caplog.at_level(logging.WARNING, logger="clues_fl.model.forward"):
        assert not splittable(model)
        assert not splittable(model)  # decided once per model
    lines = [r.getMessage() for r in caplog.records if "own forward" in r.getMessage()]
    assert len(lines) == 1 and "gpt2" in lines[0], lines
    assert first_lora_layer(model) == 2
    ckpts, refs = random_checkpoints(model, k=1)
    grads = naive_gradients(model, SAMPLES[:5], ckpts)
    settings = ScoreSettings(similarity="cosine", preconditioner="sgd", batch_size=4)
    got = score_samples(model, SAMPLES[:5], ckpts, refs, 2, settings, pad_id=0)
    rel_close(got.scores, naive_scores(grads, ckpts, refs, list(lora_parameters(model)), "cosine", "sgd"))


def test_a_wrong_adapter_is_caught_by_the_probe(monkeypatch, caplog, one_thread):
    """An adapter that ignores Gemma 3's sliding windows disagrees with the model's own
    forward on the probe batch (longer than the window): the model falls back."""

    def full_masks_only(stack, hidden, attention_mask):
        kwargs = families.typed_ropes_typed_masks(stack, hidden, attention_mask)
        full = kwargs[stack.config.layer_types.index("full_attention")]["attention_mask"]
        return [{**k, "attention_mask": full} for k in kwargs]

    wrong = families.Family("gemma3_text", full_masks_only, families._gemma_embed, families._gemma3_unsupported)
    monkeypatch.setitem(families.FAMILIES, "gemma3_text", wrong)
    with caplog.at_level(logging.WARNING, logger="clues_fl.model.forward"):
        model = tiny("gemma3", seed=2)
        assert not splittable(model)
    assert any("differs from the model's own" in r.getMessage() for r in caplog.records)
    # and the fallback is still the model's own loss
    batch = collate(SAMPLES, [0, 1, 2], pad_id=0)
    got = sample_losses(model, batch, SPLIT_LAYER).detach()
    rel_close(got, torch.stack([own_loss(model, s) for s in SAMPLES[:3]]).detach(), 1e-7)


def test_fused_attention_needs_its_own_target_modules():
    cls_name, extra, _ = FAMILIES["phi3"]
    model = transformers.Phi3ForCausalLM(getattr(transformers, cls_name)(**{**COMMON, **extra}))
    with pytest.raises(ModelError, match=r"\['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj'\].*target-modules='qkv_proj'"):
        add_lora(model, LoraSettings(target_modules=("q_proj", "v_proj")))


def test_gguf_model_name_is_converted_once_keyed_by_file(tmp_path, monkeypatch):
    from clues_fl.model import loading as model_mod

    monkeypatch.setenv("CLUES_FL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="does not exist"):
        model_mod.resolve_model_path(str(tmp_path / "missing.gguf"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []
    monkeypatch.setattr(model_mod, "convert_gguf", lambda src, target: calls.append((src, target)) or target)
    first = model_mod.resolve_model_path(str(gguf))
    assert calls[0][0] == gguf and first.startswith(str(tmp_path / "cache" / "models" / "tiny-64-"))
    gguf.write_bytes(b"GGUF" + bytes(70))  # a replaced file gets its own folder
    assert model_mod.resolve_model_path(str(gguf)) != first
