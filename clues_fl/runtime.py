"""One loaded model with its LoRA adapter, tokenizer and caches: what a site or the
server needs to train, score and evaluate. The Flower apps are thin wrappers over it.

Loading is cached per process (a Flower worker serves many messages), and every
operation first loads the adapter state it is given, so a cached workbench never
leaks state between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from clues_fl.config import LoraSection, ModelSection, RunConfig
from clues_fl.data.sources import Encoded, Sample, encode_samples
from clues_fl.model.forward import splittable
from clues_fl.scoring.alignment import AnchorScores, ScoreResult, ScoreSettings, anchor_scores, score_samples
from clues_fl.model.training import Checkpoint
from clues_fl.model.device import free_memory, resolve
from clues_fl.model.loading import (
    check_quantization_available,
    LoraSettings,
    add_lora,
    first_lora_layer,
    load_lora_state,
    load_model,
    load_tokenizer,
    lora_state,
)
from clues_fl.model.prefix_cache import PrefixCache
from clues_fl.model.training import TrainResult, TrainSettings, mean_loss, train_lora

log = logging.getLogger(__name__)


def lora_settings(cfg: RunConfig, num_layers: int) -> LoraSettings:
    return LoraSettings.from_section(cfg.lora, num_layers)


def train_settings(cfg: RunConfig, *, epochs: float | None = None, seed_offset: int = 0) -> TrainSettings:
    return TrainSettings.from_section(cfg.train, seed=cfg.run.seed + seed_offset, epochs=epochs)


def score_settings(cfg: RunConfig) -> ScoreSettings:
    return ScoreSettings.from_section(cfg.scoring)


class Workbench:
    """The base model of the `model` section with the adapter of the `lora` section."""

    def __init__(self, model: ModelSection, lora: LoraSection, seed: int, gradient_checkpointing: bool = False):
        self.tokenizer = load_tokenizer(model.name)
        base = load_model(model, gradient_checkpointing=gradient_checkpointing)
        self.lora = LoraSettings.from_section(lora, base.config.num_hidden_layers)
        torch.manual_seed(seed)  # the same initial adapter on every party
        self.model = add_lora(base, self.lora)
        self.model.eval()
        self.initial_state = lora_state(self.model)
        self.first_layer = first_lora_layer(self.model)
        self.pad_id = self.tokenizer.pad_token_id

    # -- data ---------------------------------------------------------------
    def encode(self, samples: list[Sample], cfg: RunConfig) -> list[Encoded]:
        return encode_samples(
            self.tokenizer, samples, cfg.data.max_length, system_prompt=cfg.data.system_prompt or None
        )

    def cache(self, encoded: list[Encoded], cfg: RunConfig, desc: str = "prefix cache") -> PrefixCache | None:
        if not cfg.scoring.prefix_cache or not encoded or not splittable(self.model):
            return None
        return PrefixCache.build(
            self.model, encoded, self.first_layer, pad_id=self.pad_id,
            batch_size=cfg.scoring.batch_size, desc=desc, budget=cfg.scoring.cache_budget,
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
def _cached(model: ModelSection, lora: LoraSection, seed: int, gradient_checkpointing: bool) -> Workbench:
    return Workbench(model, lora, seed, gradient_checkpointing)


def _args(cfg: RunConfig, model: ModelSection, layers: str) -> tuple:
    # the sections are frozen, so they are the cache key; target modules as their list
    lora = dataclasses.replace(cfg.lora, target_modules=",".join(cfg.lora.list("target_modules")), layers=layers)
    return (model, lora, cfg.run.seed, cfg.train.gradient_checkpointing)


def _training_args(cfg: RunConfig) -> tuple:
    return _args(cfg, cfg.model, cfg.lora.layers)


def _selection_args(cfg: RunConfig) -> tuple:
    if not cfg.scoring.model:
        return _training_args(cfg)
    return _args(cfg, dataclasses.replace(cfg.model, name=cfg.scoring.model), cfg.scoring.model_layers)


def _bench(cfg: RunConfig, args: tuple) -> Workbench:
    check_quantization_available(cfg.model)  # the install command, before anything loads
    global _on_gpu
    if resolve(cfg.model.device, cfg.model.dtype)[0].type == "cuda":
        run = (_training_args(cfg), _selection_args(cfg))
        if _on_gpu is not None and _on_gpu != run:  # one run's model(s) per process on a GPU
            _cached.cache_clear()
            free_memory()
        _on_gpu = run
    return _cached(*args)


def workbench(cfg: RunConfig) -> Workbench:
    """The trained model (`model`, `lora`): retraining, the published adapter, evaluation."""
    return _bench(cfg, _training_args(cfg))


def selection_workbench(cfg: RunConfig) -> Workbench:
    """The model the selection runs with (tracing and scoring): `scoring.model` with its
    adapter on `scoring.model-layers`, or, without one, the trained model's workbench."""
    return _bench(cfg, _selection_args(cfg))


def has_scoring_model(cfg: RunConfig) -> bool:
    """The selection runs on a model apart from the trained one."""
    return _selection_args(cfg) != _training_args(cfg)


_on_gpu: tuple | None = None  # the (trained, selection) configurations of the workbenches held on the GPU
