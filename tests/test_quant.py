"""QLoRA for real on the CPU: SmolLM2-135M in 4-bit nf4 (double quantisation, bf16
compute) through bitsandbytes. Training lowers the loss, the engine's scores equal the
naive batch-1 autograd reference on the SAME quantised model, and the smoke federation
runs in-process. One model load (~10-40 s) serves the module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

from conftest import random_checkpoints  # noqa: E402
from test_engine import flat, naive_grad  # noqa: E402
from test_flower_inprocess import drive, run_config  # noqa: E402

from clues_fl.config import parse_config  # noqa: E402
from clues_fl.scoring.alignment import ScoreSettings, score_samples  # noqa: E402
from clues_fl.model.loading import lora_parameters
from clues_fl.model.loading import load_lora_state, lora_state  # noqa: E402
from clues_fl.data.scenario import build_scenario  # noqa: E402
from clues_fl.runtime import workbench  # noqa: E402


def quant_config(out_dir, **overrides) -> dict:
    raw = run_config("smollm2-135m", out_dir, **{
        "model.quantization": "4bit", "lora.layers": "28-29", "data.samples-per-client": 6,
        "data.val-size": 4, "data.test-size": 2, "eval.max-samples": 0, "eval.mc-items": 0, "trace.rounds": 1,
        "data.max-length": 40, "train.batch-size": 4, "scoring.batch-size": 4,
    })
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    raw = quant_config(tmp_path_factory.mktemp("quant"))
    cfg = parse_config(raw)
    bench = workbench(cfg)
    samples = build_scenario(cfg, 2).clients[0]
    return raw, cfg, bench, bench.encode(samples, cfg)


def test_the_model_is_4bit_nf4_with_float32_lora(quantised):
    import bitsandbytes as bnb

    _, _, bench, _ = quantised
    linears = [m for m in bench.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and linears[0].weight.quant_type == "nf4" and linears[0].compute_dtype == torch.bfloat16
    assert linears[0].weight.quant_state.nested  # double quantisation
    assert all(p.dtype == torch.float32 for p in lora_parameters(bench.model).values())


def test_training_lowers_the_loss(quantised):
    raw, _, bench, encoded = quantised
    cfg = parse_config({**raw, "train.lr": 3e-3})
    cache = bench.cache(encoded, cfg)
    before = bench.loss(encoded, cache=cache)
    result = bench.train(encoded, cfg, epochs=4, cache=cache)
    after = bench.loss(encoded, state=lora_state(bench.model), cache=cache)
    assert np.isfinite(result.step_losses).all()
    assert after < before, (before, after, result.step_losses)


def test_scores_equal_the_batch1_reference_on_the_same_quantised_model(quantised, tmp_path):
    _, _, bench, encoded = quantised
    model, samples = bench.model, encoded[:4]
    names = list(lora_parameters(model))
    torch.manual_seed(0)
    load_lora_state(model, {n: torch.randn_like(p) * 0.02 for n, p in bench.initial_state.items()})
    ckpts, refs = random_checkpoints(model, k=1)
    ckpts = [type(c)({k: v.float() for k, v in c.state.items()}, c.lr, c.adam) for c in ckpts]
    cache = bench.cache(samples, parse_config({}))
    load_lora_state(model, ckpts[0].state)
    naive = [naive_grad(model, s) for s in samples]  # batch of one, full HF forward, full logits
    ref = flat(refs[0], names)
    for similarity in ("dot", "cosine"):
        got = score_samples(model, samples, ckpts, refs, bench.first_layer, ScoreSettings(similarity, "sgd", 4),
                            pad_id=bench.pad_id, cache=cache).scores
        want = np.array([ckpts[0].lr * float(g @ ref) / (float(g.norm() * ref.norm()) if similarity == "cosine"
                                                         else 1.0) for g in naive])
        # bf16 matmuls inside the 4-bit layers: agreement to bf16 rounding, not 1e-5
        assert np.allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max()), (similarity, got, want)


def test_smoke_federation_in_4bit(quantised, tmp_path):
    raw = quant_config(tmp_path)
    cfg, grid, run, metrics = drive(raw)
    assert all(not ex.reply.has_error() for ex in grid.log)
    assert run.bench is quantised[2]  # one quantised model per process, shared by server and sites
    assert len(metrics["selection"]["per-client"]) == 2
    assert np.isfinite(list(metrics["validation-loss"].values())).all()
    assert metrics["gpu-peak-mib"] is None  # CPU
