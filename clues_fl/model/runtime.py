"""One loaded model with its LoRA adapter, tokenizer and caches: what a site or the
server needs to train, score and evaluate. The Flower apps are thin wrappers over it.

Loading is cached per process (a Flower worker serves many messages), and every
operation first loads the adapter state it is given, so a cached workbench never
leaks state between calls.
"""

from __future__ import annotations

import functools
import logging

import torch

from clues_fl.config import RunConfig
from clues_fl.data.sources import Encoded, Sample, encode_samples
from clues_fl.model.forward import splittable
from clues_fl.scoring.alignment import AnchorScores, Checkpoint, ScoreResult, ScoreSettings, anchor_scores, score_samples
from clues_fl.model.device import free_memory, resolve
from clues_fl.model.loading import (
    check_quantization_available,
    LoraSettings,
    add_lora,
    first_lora_layer,
    load_base_model,
    load_lora_state,
    load_tokenizer,
    lora_state,
    parse_layers,
)
from clues_fl.model.prefix_cache import PrefixCache
from clues_fl.model.training import TrainResult, TrainSettings, mean_loss, train_lora

log = logging.getLogger(__name__)


def lora_settings(cfg: RunConfig, num_layers: int) -> LoraSettings:
    return LoraSettings(
        r=cfg["lora.r"],
        alpha=cfg["lora.alpha"],
        dropout=cfg["lora.dropout"],
        target_modules=tuple(cfg.list("lora.target-modules")),
        layers=parse_layers(cfg["lora.layers"], num_layers),
    )


def train_settings(cfg: RunConfig, *, epochs: float | None = None, seed_offset: int = 0) -> TrainSettings:
    return TrainSettings(
        lr=cfg["train.lr"],
        epochs=cfg["train.local-epochs"] if epochs is None else epochs,
        batch_size=cfg["train.batch-size"],
        seed=cfg["seed"] + seed_offset,
    )


def score_settings(cfg: RunConfig) -> ScoreSettings:
    return ScoreSettings(
        similarity=cfg["scoring.similarity"],
        preconditioner=cfg["scoring.preconditioner"],
        batch_size=cfg["scoring.batch-size"],
    )


class Workbench:
    def __init__(self, model_name: str, quantization: str, lora_key: tuple, seed: int,
                 placement: tuple = ("cpu", "float32", False)):
        device, dtype, checkpointing = placement
        self.tokenizer = load_tokenizer(model_name)
        base = load_base_model(model_name, quantization, device, dtype, checkpointing)
        r, alpha, dropout, targets, layer_spec = lora_key
        self.lora = LoraSettings(r, alpha, dropout, targets, parse_layers(layer_spec, base.config.num_hidden_layers))
        torch.manual_seed(seed)  # the same initial adapter on every party
        self.model = add_lora(base, self.lora)
        self.model.eval()
        self.initial_state = lora_state(self.model)
        self.first_layer = first_lora_layer(self.model)
        self.pad_id = self.tokenizer.pad_token_id

    # -- data ---------------------------------------------------------------
    def encode(self, samples: list[Sample], cfg: RunConfig) -> list[Encoded]:
        return encode_samples(
            self.tokenizer, samples, cfg["data.max-length"], system_prompt=cfg["data.system-prompt"] or None
        )

    def cache(self, encoded: list[Encoded], cfg: RunConfig, desc: str = "prefix cache") -> PrefixCache | None:
        if not cfg["scoring.prefix-cache"] or not encoded or not splittable(self.model):
            return None
        return PrefixCache.build(
            self.model, encoded, self.first_layer, pad_id=self.pad_id,
            batch_size=cfg["scoring.batch-size"], desc=desc,
        )

    # -- operations ---------------------------------------------------------
    def train(self, encoded, cfg: RunConfig, state=None, *, moments=None, start_step=0,
              epochs=None, num_checkpoints=0, cache=None, seed_offset=0, desc="training",
              proximal_mu: float = 0.0) -> TrainResult:
        load_lora_state(self.model, state if state is not None else self.initial_state)
        return train_lora(
            self.model, encoded, train_settings(cfg, epochs=epochs, seed_offset=seed_offset), self.first_layer,
            pad_id=self.pad_id, cache=cache, moments=moments, start_step=start_step,
            num_checkpoints=num_checkpoints, desc=desc, proximal_mu=proximal_mu,
        )

    def score(self, encoded, checkpoints: list[Checkpoint], anchor_grads, cfg: RunConfig, cache=None,
              settings: ScoreSettings | None = None) -> ScoreResult:
        return score_samples(
            self.model, encoded, checkpoints, anchor_grads, self.first_layer, settings or score_settings(cfg),
            pad_id=self.pad_id, cache=cache,
        )

    def anchor_scores(self, encoded, checkpoints: list[Checkpoint], cfg: RunConfig, cache=None,
                      settings: ScoreSettings | None = None) -> AnchorScores:
        return anchor_scores(
            self.model, encoded, checkpoints, self.first_layer, settings or score_settings(cfg),
            pad_id=self.pad_id, cache=cache,
        )

    def loss(self, encoded, state=None, cache=None, batch_size: int = 8) -> float:
        load_lora_state(self.model, state if state is not None else self.initial_state)
        return mean_loss(self.model, encoded, self.first_layer, pad_id=self.pad_id, batch_size=batch_size, cache=cache)


@functools.lru_cache(maxsize=2)
def _cached(model_name: str, quantization: str, lora_key: tuple, seed: int, placement: tuple) -> Workbench:
    return Workbench(model_name, quantization, lora_key, seed, placement)


def workbench(cfg: RunConfig) -> Workbench:
    check_quantization_available(cfg)  # the install command, before anything loads
    key = (
        cfg["lora.r"], cfg["lora.alpha"], cfg["lora.dropout"],
        tuple(cfg.list("lora.target-modules")), cfg["lora.layers"],
    )
    placement = (cfg["model.device"], cfg["model.dtype"], cfg["train.gradient-checkpointing"])
    args = (cfg["model.name"], cfg["model.quantization"], key, cfg["seed"], placement)
    global _on_gpu
    if resolve(cfg["model.device"], cfg["model.dtype"])[0].type == "cuda":
        if _on_gpu is not None and _on_gpu != args:  # one model per process on a GPU
            _cached.cache_clear()
            free_memory()
        _on_gpu = args
    return _cached(*args)


_on_gpu: tuple | None = None  # the configuration of the workbench held on the GPU
