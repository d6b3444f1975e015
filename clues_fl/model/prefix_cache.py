"""Disk cache of the hidden states entering the lowest LoRA layer.

They depend only on the frozen base model and the tokens, so they are the same at
every checkpoint, epoch and round, for tracing, scoring, anchor scoring and
retraining. Stored as one memory-mapped float32 array per (model, split layer,
tokens) key: a stale cache is never used because the key hashes the token ids, and
peak memory stays flat because batches are read from the memory map.

numpy has no bfloat16: a bf16 model's states are stored as float32 (exact, bf16 is
a truncated float32) and cast back per batch. On a GPU the whole cache is copied to
device memory once when it fits a budget (`gpu_budget_bytes`, default a quarter of
the free memory); otherwise each batch is gathered on the host into pinned memory
and copied asynchronously.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from clues_fl.federation.console import progress as tqdm

from clues_fl.model.device import compute_dtype, device_of
from clues_fl.model.forward import Batch, collate, length_buckets, prefix_hidden
from clues_fl.model.loading import backbone, cache_root

GPU_BUDGET_SHARE = 0.25  # of the free GPU memory, for a resident cache


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

    def __init__(self, array: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, *,
                 device=None, dtype: torch.dtype | None = None, resident: torch.Tensor | None = None):
        self.array = array
        self.offsets = offsets
        self.lengths = lengths
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype  # what batches get
        self.resident = resident  # the whole array on self.device, or None (read from the memory map)

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
        gpu_budget_bytes: int | None = None,
    ) -> "PrefixCache":
        folder = Path(cache_dir) if cache_dir else cache_root() / "prefix"
        folder.mkdir(parents=True, exist_ok=True)
        key = cache_key(model, first_lora_layer, encoded)
        data_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
        lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if not (data_path.exists() and meta_path.exists()):
            hidden_size = backbone(model).config.hidden_size
            dtype = np.float64 if compute_dtype(model) == torch.float64 else np.float32
            tmp = data_path.with_suffix(f".tmp{os.getpid()}.npy")
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=dtype, shape=(int(lengths.sum()), hidden_size)
            )
            buckets = length_buckets(encoded, batch_size)
            for rows in tqdm(buckets, desc=desc, leave=False, disable=len(buckets) < 4):
                batch = collate(encoded, rows, pad_id, device_of(model))
                hidden = prefix_hidden(model, batch, first_lora_layer).to("cpu", torch.from_numpy(
                    np.zeros(0, dtype=dtype)).dtype).numpy()
                for b, r in enumerate(rows):
                    out[offsets[r] : offsets[r] + lengths[r]] = hidden[b, : lengths[r]]
            out.flush()
            del out
            os.replace(tmp, data_path)
            meta_path.write_text(json.dumps({"samples": len(encoded), "layer": first_lora_layer}))
        array = np.load(data_path, mmap_mode="r")
        cache = cls(array, offsets, lengths, device=device_of(model), dtype=compute_dtype(model))
        if cache.device.type == "cuda":
            if gpu_budget_bytes is None:
                gpu_budget_bytes = int(GPU_BUDGET_SHARE * torch.cuda.mem_get_info(cache.device)[0])
            cache.make_resident(gpu_budget_bytes)
        return cache

    @property
    def nbytes(self) -> int:
        """Size of the whole cache on the device, in the model's dtype."""
        return int(self.array.shape[0]) * int(self.array.shape[1]) * torch.finfo(self.dtype).bits // 8

    def make_resident(self, budget_bytes: int, chunk_rows: int = 65536) -> bool:
        """Copy the whole cache to `self.device` (in the model's dtype) if it fits the
        budget; returns whether it did. Copied in chunks: the host never holds it whole."""
        if self.resident is not None:
            return True
        if self.nbytes > budget_bytes:
            return False
        out = torch.empty(tuple(self.array.shape), dtype=self.dtype, device=self.device)
        for start in range(0, self.array.shape[0], chunk_rows):
            block = torch.from_numpy(np.array(self.array[start : start + chunk_rows]))
            out[start : start + len(block)] = block.to(self.device, self.dtype)
        self.resident = out
        return True

    def subset(self, rows) -> "PrefixCache":
        """The cache of `rows` of the pool, in that order (same memory map / device copy)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        return PrefixCache(self.array, self.offsets[idx], self.lengths[idx], device=self.device,
                           dtype=self.dtype, resident=self.resident)

    def attach(self, batch: Batch) -> Batch:
        """Fill `batch.hidden` (on the batch's device, in the model's dtype) from the
        cache, zeros at padded positions."""
        width = batch.input_ids.shape[1]
        device = batch.input_ids.device
        shape = (batch.size, width, self.array.shape[1])
        if self.resident is not None:
            hidden = torch.zeros(shape, dtype=self.dtype, device=device)
            for b, r in enumerate(batch.rows):
                start, n = int(self.offsets[r]), int(self.lengths[r])
                hidden[b, :n] = self.resident[start : start + n].to(device)
            batch.hidden = hidden
            return batch
        host_dtype = torch.from_numpy(np.zeros(0, dtype=self.array.dtype)).dtype
        pinned = device.type == "cuda"
        hidden = torch.zeros(shape, dtype=host_dtype, device="cpu", pin_memory=pinned)
        for b, r in enumerate(batch.rows):
            n = int(self.lengths[r])
            block = np.array(self.array[self.offsets[r] : self.offsets[r] + n])
            hidden[b, :n] = torch.from_numpy(block)
        batch.hidden = hidden.to(device, self.dtype, non_blocking=pinned)
        return batch
