"""Disk cache of the hidden states entering the lowest LoRA layer.

They depend only on the frozen base model and the tokens, so they are the same at
every checkpoint, epoch and round, for tracing, scoring, anchor scoring and
retraining. Stored as one memory-mapped array per (model, split layer, tokens) key:
a stale cache is never used because the key hashes the token ids.

Size (`estimate_bytes`, logged before it is built): tokens x hidden size x bytes per
value, in the model's own precision: 2 bytes for a bf16 or fp16 model (bf16 as its
raw bits: numpy has no bfloat16), 4 for float32, 8 for float64; stored exactly as
the frozen layers compute them. Rows are stored shortest sample first.

Budget (`scoring.cache-budget`: a share of the free disk of the cache folder, or a
size): over it, the shortest samples that fit are cached and the others' prefix is
recomputed by the model at each pass over them (one log line says so, with that cost
in seconds per pass, timed on a probe batch). Scores do not change: a batch's cached
rows come from the file, its other rows from the same frozen layers.

Memory: the file is memory-mapped and the pages a pass has mapped are handed back to
the OS every RELEASE_BYTES (madvise DONTNEED; they stay in the page cache), so the
cache adds at most that to the process's resident memory, whatever the pool's size. On a
GPU the whole cache is copied to device memory once when it fits a budget
(`gpu_budget_bytes`, default a quarter of the free memory); otherwise each batch is
gathered on the host into pinned memory and copied asynchronously.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from clues_fl.console import progress as tqdm

from clues_fl.config import parse_cache_budget
from clues_fl.model.device import compute_dtype, device_of
from clues_fl.model.forward import Batch, collate, prefix_hidden
from clues_fl.model.loading import backbone, cache_root

log = logging.getLogger(__name__)

GPU_BUDGET_SHARE = 0.25  # of the free GPU memory, for a resident cache
RELEASE_BYTES = 16 * 2**20  # mapped from the file between two releases of its pages
# A read maps more than it asks for: the kernel maps the cached pages around a fault
# (fault-around, 64 KiB windows), so a 6 KiB read can map 128 KiB.
MAPPED_PER_READ = 2 * 64 * 2**10
FORMAT = 2  # in the key: rows shortest first, the model's own precision

# numpy storage of each compute dtype (bf16 as its raw 16 bits)
_STORAGE = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
            torch.bfloat16: np.int16}


def storage_dtype(dtype: torch.dtype) -> np.dtype:
    """How hidden states of a model computing in `dtype` are stored (bytes: .itemsize)."""
    if dtype not in _STORAGE:
        raise ValueError(f"no prefix-cache storage for hidden states in {dtype}")
    return np.dtype(_STORAGE[dtype])


def _to_numpy(hidden: torch.Tensor) -> np.ndarray:
    if hidden.dtype == torch.bfloat16:
        return hidden.view(torch.int16).numpy()
    return hidden.numpy()


def _to_torch(block: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(block)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def estimate_bytes(model, encoded: list) -> int:
    """Disk size of the whole cache: tokens x hidden size x bytes per value."""
    tokens = sum(len(e.input_ids) for e in encoded)
    return tokens * backbone(model).config.hidden_size * storage_dtype(compute_dtype(model)).itemsize


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
    digest.update(f"|layer={first_lora_layer}|format={FORMAT}|".encode())
    for e in encoded:
        digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


def budget_bytes(budget: str | int | None, folder: Path, reclaimable: int = 0) -> tuple[int | None, str]:
    """(bytes, how they were set) of `scoring.cache-budget` for a cache in `folder`
    (None: no limit); a share is of the folder's free disk plus `reclaimable` (the
    bytes of an older version of this cache, which a rebuild replaces)."""
    if budget is None:
        return None, "no budget"
    if isinstance(budget, int):
        return budget, f"{_size(budget)}"
    share, size = parse_cache_budget(budget)
    if size is not None:
        return size, f"scoring.cache-budget={budget}"
    free = shutil.disk_usage(folder).free + reclaimable
    return int(share * free), f"scoring.cache-budget={budget}: {_size(int(share * free))} of {_size(free)} free in {folder}"


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


class _Store:
    """The memory map of one cache file, shared by its subsets, with the count of bytes
    read since its pages were last handed back."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.unreleased = 0

    def read(self, start: int, n: int) -> np.ndarray:
        block = np.array(self.array[start : start + n])
        self.unreleased += block.nbytes + MAPPED_PER_READ
        if self.unreleased >= RELEASE_BYTES:
            self.release()
        return block

    def release(self) -> None:
        """Drop the pages read so far from this process (the OS keeps them cached)."""
        self.unreleased = 0
        handle = getattr(self.array, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED)


class PrefixCache:
    """Hidden states of the cached samples (their tokens, H) in a memory map; row r of
    the pool starts at `offsets[r]` (-1: not cached, its prefix is computed by `model`)."""

    def __init__(self, store: _Store, offsets: np.ndarray, lengths: np.ndarray, *, model=None,
                 first_layer: int = 0, device=None, dtype: torch.dtype | None = None,
                 resident: torch.Tensor | None = None):
        self.store = store
        self.offsets = offsets
        self.lengths = lengths
        self.model = model  # computes the rows that are not cached
        self.first_layer = first_layer
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.from_numpy(np.zeros(0, dtype=store.array.dtype)).dtype  # what batches get
        self.resident = resident  # the whole array on self.device, or None (read from the memory map)

    @property
    def array(self) -> np.ndarray:
        return self.store.array

    @property
    def cached(self) -> int:
        """How many of this cache's rows come from the file."""
        return int((self.offsets >= 0).sum())

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
        budget: str | int | None = None,
    ) -> PrefixCache:
        """The cache of `encoded`, read from its file or built. `budget`: the disk it may
        take (`scoring.cache-budget`: a share of the free disk such as "0.5", a size such
        as "20GB", or bytes; None: no limit)."""
        folder = Path(cache_dir) if cache_dir else cache_root() / "prefix"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{cache_key(model, first_lora_layer, encoded)}.npy"
        dtype = compute_dtype(model)
        hidden_size = backbone(model).config.hidden_size
        per_token = hidden_size * storage_dtype(dtype).itemsize
        lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
        order = np.lexsort((np.arange(len(encoded)), lengths))  # shortest first, as forward.length_buckets
        ends = np.cumsum(lengths[order])  # tokens of the first k+1 samples of `order`
        total = int(ends[-1]) * per_token if len(ends) else 0
        existing = _cached_tokens(path)
        limit, how = budget_bytes(budget, folder, reclaimable=existing * per_token if existing is not None else 0)
        fits = len(order) if limit is None else int(np.searchsorted(ends * per_token, limit, side="right"))
        log.info("%s: %d samples, %d tokens x %d x %d bytes = %s (%s)", desc, len(encoded),
                 int(ends[-1]) if len(ends) else 0, hidden_size, storage_dtype(dtype).itemsize, _size(total), how)
        count = _samples_in(existing, ends)
        if count is None or count < fits:
            count = fits
            if count:
                _write(model, encoded, order[:count], int(ends[count - 1]), first_lora_layer, pad_id, batch_size,
                       path, storage_dtype(dtype), desc)
        array = np.load(path, mmap_mode="r") if count else np.zeros((0, hidden_size), storage_dtype(dtype))
        offsets = np.full(len(encoded), -1, dtype=np.int64)
        offsets[order[:count]] = np.concatenate([[0], ends[: count - 1]]) if count else []
        cache = cls(_Store(array), offsets, lengths, model=model, first_layer=first_lora_layer,
                    device=device_of(model), dtype=dtype)
        if count < len(encoded):
            rest = order[count:]
            seconds = cache.probe_seconds(encoded, rest[:batch_size], pad_id)
            per_pass = seconds * int(lengths[rest].sum()) / max(1, int(lengths[rest[:batch_size]].sum()))
            log.warning(
                "%s: %s for %d samples is over the budget (%s): %d of them cached (the shortest, %s); the other "
                "%d recompute the frozen layers below layer %d at every pass over them, about %.3g s a pass", desc,
                _size(total), len(encoded), how, count, _size(int(ends[count - 1]) * per_token if count else 0),
                len(rest), first_lora_layer, per_pass)
        if cache.device.type == "cuda" and count:
            if gpu_budget_bytes is None:
                gpu_budget_bytes = int(GPU_BUDGET_SHARE * torch.cuda.mem_get_info(cache.device)[0])
            cache.make_resident(gpu_budget_bytes)
        return cache

    def probe_seconds(self, encoded: list, rows, pad_id: int) -> float:
        """Seconds the frozen layers take for `rows` (one batch: the cost estimate)."""
        if not len(rows):
            return 0.0
        batch = collate(encoded, [int(r) for r in rows], pad_id, self.device)
        start = time.perf_counter()
        prefix_hidden(self.model, batch, self.first_layer)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    @property
    def disk_bytes(self) -> int:
        """Size of the cached rows in the file (its header aside)."""
        return int(self.array.nbytes)

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
            block = _to_torch(self.store.read(start, chunk_rows), self.dtype)
            out[start : start + len(block)] = block.to(self.device, self.dtype)
        self.store.release()
        self.resident = out
        return True

    def subset(self, rows) -> PrefixCache:
        """The cache of `rows` of the pool, in that order (same memory map / device copy)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        return PrefixCache(self.store, self.offsets[idx], self.lengths[idx], model=self.model,
                           first_layer=self.first_layer, device=self.device, dtype=self.dtype,
                           resident=self.resident)

    def attach(self, batch: Batch) -> Batch:
        """Fill `batch.hidden` (on the batch's device, in the model's dtype, zeros at
        padded positions): cached rows from the cache, the others from the frozen
        layers. A batch without any cached row is left as it is (the forward computes
        its prefix)."""
        starts = self.offsets[batch.rows]
        cached = starts >= 0
        if not cached.any():
            return batch
        width = batch.input_ids.shape[1]
        device = batch.input_ids.device
        shape = (batch.size, width, self.array.shape[1])
        if self.resident is not None:
            hidden = torch.zeros(shape, dtype=self.dtype, device=device)
            for b in np.flatnonzero(cached):
                start, n = int(starts[b]), int(self.lengths[batch.rows[b]])
                hidden[b, :n] = self.resident[start : start + n].to(device)
        else:
            pinned = device.type == "cuda"
            host = torch.zeros(shape, dtype=self.dtype, device="cpu", pin_memory=pinned)
            for b in np.flatnonzero(cached):
                n = int(self.lengths[batch.rows[b]])
                host[b, :n] = _to_torch(self.store.read(int(starts[b]), n), self.dtype)
            hidden = host.to(device, non_blocking=pinned)
        if not cached.all():
            rest = torch.as_tensor(np.flatnonzero(~cached), device=device)
            n = int(batch.attention_mask[rest].sum(1).max())
            part = Batch([batch.ids[i] for i in rest.tolist()], batch.input_ids[rest, :n],
                         batch.attention_mask[rest, :n], batch.target_mask[rest, :n],
                         [batch.rows[i] for i in rest.tolist()])
            computed = prefix_hidden(self.model, part, self.first_layer).to(self.dtype)
            hidden[rest, :n] = computed * part.attention_mask.unsqueeze(-1).to(self.dtype)  # zeros at padding
        batch.hidden = hidden
        return batch


def _cached_tokens(path: Path) -> int | None:
    """Rows (tokens) of the cache file at `path`, or None when there is none."""
    if not path.exists():
        return None
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):  # a truncated or foreign file: rebuilt
        return None


def _samples_in(tokens: int | None, ends: np.ndarray) -> int | None:
    """How many of the shortest samples a file of `tokens` rows holds (None: it is not
    a cache of these samples)."""
    if tokens is None:
        return None
    if tokens == 0:
        return 0
    count = int(np.searchsorted(ends, tokens, side="right"))
    return count if count and int(ends[count - 1]) == tokens else None


def _write(model, encoded: list, rows: np.ndarray, tokens: int, first_lora_layer: int, pad_id: int,
           batch_size: int, path: Path, dtype: np.dtype, desc: str) -> None:
    """Compute and write the hidden states of `rows` (shortest first) to `path`,
    sequentially (no page of the file stays mapped), then move it into place."""
    hidden_size = backbone(model).config.hidden_size
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (tokens, hidden_size)}
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    device = device_of(model)
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for chunk in tqdm(chunks, desc=desc, leave=False, disable=len(chunks) < 4):
            batch = collate(encoded, [int(r) for r in chunk], pad_id, device)
            hidden = _to_numpy(prefix_hidden(model, batch, first_lora_layer).to("cpu"))
            for b, r in enumerate(chunk):
                fh.write(np.ascontiguousarray(hidden[b, : len(encoded[r].input_ids)]).tobytes())
    os.replace(tmp, path)
