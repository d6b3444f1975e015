"""One-shot LoRA merging: exact dW arithmetic, TIES, forward pass and save/reload."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_lora_model
from peft import PeftModel

from clues_fl.aggregation.merging import MERGE_METHODS, lora_deltas, merge_adapters, merge_weights
from clues_fl.model.loading import lora_state

SCALING = 2.0  # tiny_lora_model uses alpha = 2 r


def client_states(seeds=(1, 2, 3), **kwargs):
    return [lora_state(tiny_lora_model(seed, **kwargs)) for seed in seeds]


def hand_delta(state: dict, module: str, scaling: float = SCALING) -> torch.Tensor:
    return scaling * state[f"{module}.lora_B.default.weight"] @ state[f"{module}.lora_A.default.weight"]


def hand_ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim to top-density magnitudes, elect sign, disjoint mean."""
    trimmed = []
    for d in deltas:
        keep = torch.zeros(d.numel(), dtype=d.dtype)
        keep[d.abs().flatten().topk(int(density * d.numel())).indices] = 1
        trimmed.append(d * keep.view_as(d))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(d.dtype)
    agree = (stacked.sign() == sign).to(d.dtype)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def logits(model, seed=0):
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- weights ------------------------------------------------------------------------


def test_merge_weights():
    assert MERGE_METHODS == ("linear", "weighted", "ties")
    assert merge_weights("linear", [5, 0, 9], [0.1, float("nan"), -2.0]) == pytest.approx([1 / 3] * 3)
    assert merge_weights("ties", [5, 7], [0.1, 0.2]) == pytest.approx([0.5, 0.5])
    # w_i ∝ kept_i * exp(mean_i - max mean); a client that kept nothing gets 0
    raw = np.array([10 * math.exp(0.0), 20 * math.exp(-1.0), 0.0])
    got = merge_weights("weighted", [10, 20, 0], [0.5, -0.5, float("nan")])
    assert got == pytest.approx((raw / raw.sum()).tolist())
    assert sum(got) == pytest.approx(1.0)
    # equal scores -> FedAvg count weighting; shifting all scores changes nothing
    assert merge_weights("weighted", [1, 3], [-7.0, -7.0]) == pytest.approx([0.25, 0.75])
    assert merge_weights("weighted", [4, 6], [0.2, 1.2]) == pytest.approx(merge_weights("weighted", [4, 6], [-5.8, -4.8]))
    # higher temperature -> closer to count weighting
    hot = merge_weights("weighted", [1, 1], [0.0, 1.0], temperature=100.0)
    assert hot[0] == pytest.approx(0.5, abs=0.01)


def test_merge_weights_errors():
    with pytest.raises(ValueError, match="linear, weighted, ties"):
        merge_weights("fedavg", [1], [0.0])
    with pytest.raises(ValueError, match="kept 0"):
        merge_weights("weighted", [0, 0], [float("nan")] * 2)
    with pytest.raises(ValueError, match="non-finite"):
        merge_weights("weighted", [3, 1], [float("nan"), 0.0])
    with pytest.raises(ValueError, match="mean_scores"):
        merge_weights("weighted", [3, 1], [0.0])


# --- linear / weighted: exact sum of dW ---------------------------------------------


@pytest.mark.parametrize("method", ["linear", "weighted"])
def test_linear_and_weighted_merge_sum_of_deltas_exactly(method):
    states = client_states()
    weights = merge_weights(method, [30, 10, 20], [0.4, -0.2, 1.1])
    model = merge_adapters(tiny_lora_model(0), states, weights, method)
    assert model.active_adapter == "merged"
    assert set(model.peft_config) == {"default", "merged"}  # client adapters removed
    merged = lora_deltas(model, "merged")
    assert len(merged) == 4  # q_proj, v_proj in layers 2 and 3
    for module, delta in merged.items():
        expected = sum(w * hand_delta(s, module) for w, s in zip(weights, states))
        assert delta.dtype == torch.float64
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
        assert (delta - expected).abs().max() < 1e-12
    assert model.peft_config["merged"].r == 12  # 'cat' stacks the ranks


def test_averaging_factors_is_not_averaging_updates():
    """FedAvg of A and B separately gives mean(B) @ mean(A), with cross terms B_i A_j."""
    states = client_states()
    model = tiny_lora_model(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in states[0]:
            params[name].copy_(sum(s[name] for s in states) / len(states))
    naive = lora_deltas(model, "default")
    for module, delta in naive.items():
        exact = sum(hand_delta(s, module) for s in states) / len(states)
        assert (delta - exact).norm() > 0.5 * exact.norm()


def test_merge_with_unequal_ranks_and_single_client():
    states = [lora_state(tiny_lora_model(1, r=4)), lora_state(tiny_lora_model(2, r=2))]
    model = merge_adapters(tiny_lora_model(0), states, [0.7, 0.3], "weighted")
    # the model's lora_alpha (8) is kept: scaling 8/4 = 2 and 8/2 = 4
    for module, delta in lora_deltas(model, "merged").items():
        expected = 0.7 * hand_delta(states[0], module, 2.0) + 0.3 * hand_delta(states[1], module, 4.0)
        assert (delta - expected).abs().max() < 1e-12
    for method in ("linear", "ties"):
        # one adapter: peft's linear rule, sqrt(w * scaling) on each factor, the weight
        # passing through a float32 tensor -> exact up to ~1e-7 relative
        single = merge_adapters(tiny_lora_model(0), states[:1], [0.9], method)
        for module, delta in lora_deltas(single, "merged").items():
            torch.testing.assert_close(delta, 0.9 * hand_delta(states[0], module), rtol=1e-6, atol=1e-9)


def test_remerging_replaces_the_merged_adapter():
    states = client_states()
    model = tiny_lora_model(0)
    merge_adapters(model, states, [0.5, 0.3, 0.2], "weighted")
    merge_adapters(model, states[:2], [0.5, 0.5], "linear")
    assert set(model.peft_config) == {"default", "merged"}
    for module, delta in lora_deltas(model, "merged").items():
        expected = 0.5 * hand_delta(states[0], module) + 0.5 * hand_delta(states[1], module)
        assert (delta - expected).abs().max() < 1e-12


def test_merge_rejects_mismatched_states():
    states = client_states()
    with pytest.raises(ValueError, match="do not match"):
        merge_adapters(tiny_lora_model(0), [states[0], client_states((4,), layers=(3,))[0]], [0.5, 0.5], "linear")
    with pytest.raises(ValueError, match="weights"):
        merge_adapters(tiny_lora_model(0), states, [1.0], "linear")
    with pytest.raises(ValueError, match="linear, weighted, ties"):
        merge_adapters(tiny_lora_model(0), states, [1 / 3] * 3, "svd")


# --- TIES ---------------------------------------------------------------------------


def test_ties_full_rank_equals_ties_on_deltas_and_keeps_agreed_signs():
    kwargs = dict(targets=("q_proj",))  # 32 x 32: svd_rank 32 reproduces TIES exactly
    states = client_states(**kwargs)
    weights = merge_weights("ties", [5, 5, 5], [0.0, 0.0, 0.0])
    model = merge_adapters(tiny_lora_model(0, **kwargs), states, weights, "ties", density=0.5, svd_rank=32)
    for module, delta in lora_deltas(model, "merged").items():
        client = [hand_delta(s, module) for s in states]
        expected = hand_ties(client, 0.5)
        assert (delta - expected).abs().max() < 1e-10
        signs = torch.stack([d.sign() for d in client])
        agree = (signs == signs[0]).all(0)
        common = signs[0][agree]
        assert agree.float().mean() > 0.1  # the property is tested on many entries
        assert (delta[agree] * common >= -1e-12).all()
        # ... and is strictly of that sign wherever some client survived trimming
        survived = torch.stack([e != 0 for e in [hand_ties([d], 0.5) for d in client]]).any(0)
        assert (delta[agree & survived] * signs[0][agree & survived] > 0).all()
        # TIES is not the plain average
        assert (delta - sum(client) / 3).abs().max() > 1e-3


def test_ties_default_rank_is_best_low_rank_approximation():
    states = client_states()
    model = merge_adapters(tiny_lora_model(0), states, [1 / 3] * 3, "ties", density=0.5)
    assert model.peft_config["merged"].r == 12  # sum of client ranks (< min dim 16 of v_proj)
    for module, delta in lora_deltas(model, "merged").items():
        full = hand_ties([hand_delta(s, module) for s in states], 0.5)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        best = u[:, :12] @ torch.diag(s[:12]) @ vh[:12]
        assert (delta - best).abs().max() < 1e-10


# --- forward pass and save / reload -------------------------------------------------


@pytest.mark.parametrize("method", ["weighted", "ties"])
def test_merged_forward_and_reload(method, tmp_path):
    states = client_states()
    model = merge_adapters(tiny_lora_model(0), states, merge_weights(method, [3, 1, 2], [0.5, 0.1, -0.3]), method)
    model.eval()
    got = logits(model)

    # base model with the merged update folded into its weights
    folded = tiny_llama(0)
    with torch.no_grad():
        for module, delta in lora_deltas(model, "merged").items():
            folded.get_submodule(module.removeprefix("base_model.model.")).weight.add_(delta)
    torch.testing.assert_close(got, logits(folded), rtol=0, atol=1e-10)
    assert (got - logits(tiny_llama(0))).abs().max() > 1e-4  # the update does something

    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "merged")
    reloaded.eval()
    assert torch.equal(logits(reloaded), got)


# --- merge rules: one registry, pure functions, and a user's own -----------------------


def test_builtin_rules_are_registered_functions_of_the_deltas():
    from clues_fl.aggregation.merging import MERGE_RULES, merge_rule

    assert tuple(MERGE_RULES) == MERGE_METHODS and merge_rule("ties") is MERGE_RULES["ties"]
    states = client_states()
    weights = merge_weights("weighted", [30, 10, 20], [0.4, -0.2, 1.1])
    model = merge_adapters(tiny_lora_model(0), states, weights, "weighted")
    for module, delta in lora_deltas(model, "merged").items():  # the low-rank merge = the rule on dW
        rule = MERGE_RULES["weighted"].combine([hand_delta(s, module) for s in states],
                                               torch.tensor(weights, dtype=torch.float64))
        torch.testing.assert_close(delta, rule.to(delta.dtype), rtol=0, atol=1e-9)


USER_RULE = '''
import torch

calls = []

def sign_mean(task_tensors, weights):
    """A user's merge rule: the weighted mean where the sites agree in sign, 0 elsewhere."""
    calls.append(len(task_tensors))
    stacked = torch.stack(task_tensors)
    mean = sum(w * t for w, t in zip(weights, task_tensors))
    agree = (torch.sign(stacked) == torch.sign(stacked[0])).all(0)
    return torch.where(agree, mean, torch.zeros_like(mean))
'''


@pytest.fixture
def user_rule_module(tmp_path, monkeypatch):
    (tmp_path / "my_merge_rules.py").write_text(USER_RULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    yield importlib.import_module("my_merge_rules")
    import sys

    sys.modules.pop("my_merge_rules", None)


def test_a_users_merge_rule_from_a_module(user_rule_module):
    q = {"targets": ("q_proj",)}  # 32 x 32: svd_rank 32 is full rank (v_proj is 16 x 32)
    states = client_states(**q)
    assert merge_weights("my_merge_rules:sign_mean", [5, 1, 2], [0.0, 1.0, 2.0]) == [1 / 3] * 3  # uniform
    # svd_rank = min(out, in) of the modules: the merged dW exactly (by default: its best
    # approximation of rank sum r_i; exact for a linear rule, whose result has that rank)
    model = merge_adapters(tiny_lora_model(0, **q), states, [1 / 3] * 3, "my_merge_rules:sign_mean", svd_rank=32)
    assert user_rule_module.calls == [3] * 2  # once per adapted module
    assert model.active_adapter == "merged" and set(model.peft_config) == {"default", "merged"}
    for module, delta in lora_deltas(model, "merged").items():
        deltas = [hand_delta(s, module) for s in states]
        expected = user_rule_module.sign_mean(deltas, torch.tensor([1 / 3] * 3, dtype=torch.float64))
        torch.testing.assert_close(delta, expected.to(delta.dtype), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="merge.rule: module 'my_merge_rules' has no 'nope'"):
        merge_weights("my_merge_rules:nope", [1], [0.0])


def test_a_users_merge_rule_from_the_run_config(tiny_model_dir, tmp_path, user_rule_module):
    from test_flower_inprocess import drive, run_config

    raw = run_config(tiny_model_dir, tmp_path, mode="merging", **{"retrain.mode": "merge",
                                                                    "merge.rule": "my_merge_rules:sign_mean",
                                                                    "eval.max-samples": 0, "eval.mc-items": 0})
    cfg, grid, run, metrics = drive(raw)
    assert user_rule_module.calls and metrics["aggregate"]["rule"] == "my_merge_rules:sign_mean"
    assert set(metrics["threshold"]["merge-weights"].values()) == {0.5}
    assert "selected" in metrics["validation-loss"]
    assert any((tmp_path / "inprocess" / "adapter").rglob("adapter_config.json"))


def test_peft_merge_utils_functions_are_merge_rules():
    states = client_states()
    model = merge_adapters(tiny_lora_model(0), states, [1 / 3] * 3, "peft.utils.merge_utils:task_arithmetic")
    for module, delta in lora_deltas(model, "merged").items():
        expected = sum(hand_delta(s, module) for s in states) / 3
        torch.testing.assert_close(delta, expected.to(delta.dtype), rtol=0, atol=1e-9)
