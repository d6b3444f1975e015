"""Disk cache of the hidden states entering the lowest LoRA layer.

They depend only on the frozen base model and the tokens, so they are the same at
every checkpoint, epoch and round, for tracing, scoring, anchor scoring and
retraining. Stored as one memory-mapped float32 array per (model, split layer,
tokens) key: a stale cache is never used because the key hashes the token ids, and
peak memory stays flat because batches are read from the memory map.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from .console import progress as tqdm

from .forward import Batch, collate, length_buckets, prefix_hidden
from .model import backbone, cache_root


def model_fingerprint(model) -> str:
    """Identity of the frozen base: its path, shape and a checksum of real weights."""
    stack = backbone(model)
    config = stack.config
    embed = stack.get_input_embeddings().weight
    probe = embed[:16].double().sum().item()
    first = next((m for m in stack.layers[0].modules() if isinstance(m, torch.nn.Linear)), None)
    probe += first.weight.double().abs().sum().item() if first is not None else 0.0
    return f"{config.name_or_path}|{config.hidden_size}|{config.num_hidden_layers}|{embed.dtype}|{probe:.10e}"


def cache_key(model, first_lora_layer: int, encoded: list) -> str:
    digest = hashlib.sha256()
    digest.update(model_fingerprint(model).encode())
    digest.update(f"|layer={first_lora_layer}|".encode())
    for e in encoded:
        digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


class PrefixCache:
    """Hidden states (sum of lengths, H) in a memory map, one row block per sample."""

    def __init__(self, array: np.ndarray, offsets: np.ndarray, lengths: np.ndarray):
        self.array = array
        self.offsets = offsets
        self.lengths = lengths

    @classmethod
    def build(
        cls,
        model,
        encoded: list,
        first_lora_layer: int,
        *,
        pad_id: int,
        batch_size: int = 8,
        cache_dir: Path | None = None,
        desc: str = "prefix cache",
    ) -> "PrefixCache":
        folder = Path(cache_dir) if cache_dir else cache_root() / "prefix"
        folder.mkdir(parents=True, exist_ok=True)
        key = cache_key(model, first_lora_layer, encoded)
        data_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
        lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if not (data_path.exists() and meta_path.exists()):
            hidden_size = backbone(model).config.hidden_size
            dtype = np.float64 if backbone(model).get_input_embeddings().weight.dtype == torch.float64 else np.float32
            tmp = data_path.with_suffix(f".tmp{os.getpid()}.npy")
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=dtype, shape=(int(lengths.sum()), hidden_size)
            )
            buckets = length_buckets(encoded, batch_size)
            for rows in tqdm(buckets, desc=desc, leave=False, disable=len(buckets) < 4):
                batch = collate(encoded, rows, pad_id)
                hidden = prefix_hidden(model, batch, first_lora_layer).numpy()
                for b, r in enumerate(rows):
                    out[offsets[r] : offsets[r] + lengths[r]] = hidden[b, : lengths[r]]
            out.flush()
            del out
            os.replace(tmp, data_path)
            meta_path.write_text(json.dumps({"samples": len(encoded), "layer": first_lora_layer}))
        array = np.load(data_path, mmap_mode="r")
        return cls(array, offsets, lengths)

    def subset(self, rows) -> "PrefixCache":
        """The cache of `rows` of the pool, in that order (same memory map)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        return PrefixCache(self.array, self.offsets[idx], self.lengths[idx])

    def attach(self, batch: Batch) -> Batch:
        """Fill `batch.hidden` from the cache (zeros at padded positions)."""
        dtype = torch.from_numpy(np.zeros(0, dtype=self.array.dtype)).dtype
        width = batch.input_ids.shape[1]
        hidden = torch.zeros((batch.size, width, self.array.shape[1]), dtype=dtype)
        for b, r in enumerate(batch.rows):
            n = int(self.lengths[r])
            block = np.array(self.array[self.offsets[r] : self.offsets[r] + n])
            hidden[b, :n] = torch.from_numpy(block).to(dtype)
        batch.hidden = hidden
        return batch
