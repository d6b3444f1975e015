"""Every message of the protocol survives to_record -> from_record unchanged (tensors
included), and its record layout is the one the other side reads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clues_fl.federation import messages as msg
from clues_fl.model.training import AdamMoments, Checkpoint


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.2.q_proj.lora_A": torch.randn(4, 8, generator=g),
            "layers.2.q_proj.lora_B": torch.randn(8, 4, generator=g)}


def _moments(seed: int) -> AdamMoments:
    return AdamMoments(_tensors(seed), {k: v.abs() for k, v in _tensors(seed + 1).items()})


def _same(a, b) -> bool:
    """Deep equality that compares tensors and arrays by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _roundtrip(message, **kw):
    record = message.to_record()
    assert isinstance(record, RecordDict)
    for name, value in record.items():  # only Flower's record types travel
        assert isinstance(value, (ArrayRecord, ConfigRecord, MetricRecord)), name
    back = type(message).from_record(record, **kw)
    assert _same(back, message), (message, back)
    return record


def test_the_helper_sees_differences():
    a = msg.TrainReply(_tensors(0), 8, 1.5)
    assert _same(a, msg.TrainReply(_tensors(0), 8, 1.5))
    assert not _same(a, msg.TrainReply(_tensors(1), 8, 1.5))
    assert not _same(a, msg.TrainReply(_tensors(0), 8, 1.25))


@pytest.mark.parametrize("moments", [None, "moments"])
def test_train_request(moments):
    request = msg.TrainRequest(_tensors(0), "trace", 3, 0.01, _moments(5) if moments else None)
    record = _roundtrip(request)
    # Flower's layout: what FedAvg/FedProx's configure_train sends, plus the moments record
    assert set(record.keys()) == {"arrays", "config"} | ({msg.MOMENTS_KEY} if moments else set())
    assert dict(record["config"]) == {"phase": "trace", "server-round": 3, "proximal-mu": 0.01}


def test_train_request_as_flowers_strategy_sends_it():
    """Flower's strategies send "server-round" (and FedProx "proximal-mu") in the train
    config next to the server's phase; plain FedAvg sends no proximal-mu."""
    content = RecordDict({"arrays": msg.state_record(_tensors(0)), "config": msg.train_config("aggregate")})
    content["config"]["server-round"] = 2
    request = msg.TrainRequest.from_record(content)
    assert (request.phase, request.server_round, request.proximal_mu, request.moments) == ("aggregate", 2, 0.0, None)
    assert _same(request.state, _tensors(0))
    # moments riding in the adapter's record (saved checkpoints) are read too
    joined = RecordDict({"arrays": msg.state_record(_tensors(0), _moments(1)), "config": msg.train_config("trace")})
    assert _same(msg.TrainRequest.from_record(joined).moments, _moments(1))


@pytest.mark.parametrize("moments,peak", [(None, None), ("moments", 123.5)])
def test_train_reply(moments, peak):
    reply = msg.TrainReply(_tensors(2), 8, 2.25, 4, 0.5, _moments(3) if moments else None, peak)
    record = _roundtrip(reply)
    assert record["metrics"]["num-examples"] == 8  # what Flower's strategies weight by
    assert (msg.GPU_PEAK_KEY in record["metrics"]) == (peak is not None)


def test_local_train_request():
    for phase in ("trace", "aggregate"):
        assert _roundtrip(msg.LocalTrainRequest(phase))["config"]["phase"] == phase
    assert msg.LocalTrainRequest.message_type == "train.local"


def test_local_train_reply():
    checkpoints = [Checkpoint(_tensors(k), 0.002, _moments(10 + k)) for k in range(3)]
    reply = msg.LocalTrainReply(_tensors(0), 8, 1.75, checkpoints, "ab" * 16, 7.0)
    record = _roundtrip(reply, lr=0.002)
    assert {f"ckpt-{k}" for k in range(3)} <= set(record.keys())
    # the learning rate does not travel: the server gives it
    assert [c.lr for c in msg.LocalTrainReply.from_record(record, lr=0.5).checkpoints] == [0.5] * 3
    _roundtrip(msg.LocalTrainReply(_tensors(0), 8, 1.75))  # retraining: no checkpoints


@pytest.mark.parametrize("privacy", [
    None,
    msg.PrivacySettings("histogram", edges=[-1.0, 0.0, 1.5]),
    msg.PrivacySettings("scores", epsilon=0.5, delta=1e-6, clip_lo=-2.0, clip_hi=3.0),
    msg.PrivacySettings("histogram", epsilon=1.0, delta=1e-5, edges=[0.0, 1.0], clip_lo=-1.0, clip_hi=1.0),
])
def test_score_request(privacy):
    checkpoints = [Checkpoint(_tensors(k), 0.001 * (k + 1), _moments(20 + k)) for k in range(2)]
    grads = [_tensors(30 + k) for k in range(2)]
    scorer = {"tau": 0.25, "budget": 0.5, "signals": ["clues", "ppl"], "signal-centre": [0.1, 0.2]}
    request = msg.ScoreRequest("clues", checkpoints, grads, scorer, privacy)
    record = _roundtrip(request)
    assert {"ckpt-0", "ckpt-1", "grad-0", "grad-1"} <= set(record.keys())
    _roundtrip(msg.ScoreRequest("ppl"))  # a method that needs no trace
    _roundtrip(msg.ScoreRequest("less", checkpoints))  # checkpoints without anchor gradients


def test_privacy_settings_as_the_server_keeps_them():
    settings = msg.PrivacySettings("histogram", 0.5, 1e-6, [0.0, 1.0], -1.0, 2.0)
    assert msg.PrivacySettings.from_config(settings.to_config()) == settings
    assert msg.PrivacySettings.from_config({}) == msg.PrivacySettings()


@pytest.mark.parametrize("reply", [
    msg.ScoreReply(3, ["a" * 32, "b" * 32, "c" * 32], [0.5, -1.0, 2.0], partition_id=1, score_seconds=0.25,
                   skipped_rows=1, truncated=2, scored=3),
    msg.ScoreReply(16, histogram=[0, 3, 5, 8], partition_id=0, scored=16, gpu_peak_mib=50.0),
    msg.ScoreReply(16, ["d" * 32] * 16, [1.0] * 16, scored=5,
                   extras={"clusters": 4, "selected-clusters": 2, "bandit-iterations": 7, "my-extra": 0.5}),
])
def test_score_reply(reply):
    record = _roundtrip(reply)
    assert ("histogram" in record) == (reply.histogram is not None) != ("scores" in record)
    # a custom scorer's extras reach the server
    assert msg.ScoreReply.from_record(record).extras == reply.extras


def test_score_reply_without_scored_counts_all():
    record = msg.ScoreReply(4, ["x"] * 4, [0.0] * 4).to_record()
    assert msg.ScoreReply.from_record(record).scored == 4


@pytest.mark.parametrize("request_", [
    msg.SelectRequest(threshold=0.25),
    msg.SelectRequest(ratio=0.5),
    msg.SelectRequest(threshold=-0.5, anchor_mean=1.5, anchor_std=0.25),
    msg.SelectRequest(threshold=0.0, ids=["a" * 32, "b" * 32], scores=[0.5, -0.5]),
])
def test_select_request(request_):
    _roundtrip(request_)
    assert request_.decision == ({"threshold": request_.threshold} if request_.threshold is not None
                                 else {"ratio": request_.ratio})


@pytest.mark.parametrize("reply", [
    msg.SelectReply(8, 5, 0.75, True, {"tp": 3, "fp": 2, "fn": 1, "tn": 2}, (3, 4)),
    msg.SelectReply(8, 0, 0.0, False),
])
def test_select_reply(reply):
    _roundtrip(reply)


def test_identify_and_describe():
    _roundtrip(msg.IdentifyRequest())
    _roundtrip(msg.IdentifyReply(msg.ids_digest(["x", "y"]), 2, 1))
    _roundtrip(msg.DescribeRequest())
    _roundtrip(msg.SiteDescription("client-0", 0))
    record = _roundtrip(msg.SiteDescription("hospital-a", -1, "hospital-a.jsonl"))
    assert record["site"]["data-file"] == "hospital-a.jsonl"


def test_every_exchange_has_a_message_type():
    requests = (msg.TrainRequest, msg.LocalTrainRequest, msg.ScoreRequest, msg.SelectRequest, msg.IdentifyRequest,
                msg.DescribeRequest)
    assert [r.message_type for r in requests] == ["train", "train.local", "query.score", "query.select",
                                                  "query.identify", "query.site"]


def test_wire_bytes_count_the_arrays_and_the_per_sample_scores():
    """A message's bytes on the wire grow with its arrays' bytes and, for a score reply,
    with its samples; the same array twice in one message travels once."""
    state = _tensors(0)
    array_bytes = sum(t.numel() * 4 for t in state.values())
    train = msg.wire_bytes(msg.TrainRequest(state).to_record())
    assert array_bytes < train < array_bytes + 2000
    with_moments = msg.wire_bytes(msg.TrainRequest(state, moments=_moments(1)).to_record())
    assert with_moments - train >= 2 * array_bytes
    replies = [msg.wire_bytes(msg.ScoreReply(n, ids=[f"{i:016x}" for i in range(n)],
                                             scores=[0.5 + i for i in range(n)]).to_record()) for n in (100, 1100)]
    assert 16 + 8 <= (replies[1] - replies[0]) / 1000 <= 40  # an id of 16 characters and a float64 per sample
    once = msg.wire_bytes(RecordDict({"a": msg.state_record(state)}))
    twice = msg.wire_bytes(RecordDict({"a": msg.state_record(state), "b": msg.state_record(state)}))
    assert once < twice < once + 100
