"""Several per-sample quality signals and one anchor-calibrated score from them.

Gradient alignment (CLUES) catches answers from another domain and little else: an
exchanged, cut or garbled answer in the right domain aligns with the anchors like a
clean one. Other signals see those, but each on its own is a poor ranker (fluent bad
answers exist), so raw values are not summed: each gets a clean model (from the anchors,
refined with the site's own pool), and a sample scores how far short of the clean models
it falls on all signals together.

Signals (computed at the site from the scoring pass it already makes, three forward
passes of the base model (over the sample, its answer alone, its answer's end), one of a
small sentence encoder and the text; ``DEFAULT_SIGNALS`` are the ones ``clues+`` uses unless
``selection.signals`` names others):

==============  ==============================================  ========  ==========================
name            what                                            good is   an outlier below means
==============  ==============================================  ========  ==========================
``clues``       CLUES alignment with the anchor gradient         high      off-domain
``domain``      cosine of the question's sentence embedding      high      off-domain
                with the anchors' mean question embedding
``loss``        answer loss at the last trace checkpoint         low       garbled (not in the default:
                                                                            it moves with base-loss)
``learn``       loss drop first -> last checkpoint (learning)    high      garbled (not in the default:
                                                                            bad samples' loss drops MORE)
``base-loss``   answer loss under the base model                 low       garbled
``qinfo``       loss(answer alone) - loss(answer | question)     high      answer unrelated to question
``eos``         loss of the end-of-answer token (base model),    low       truncated
                given the answer's last tokens (so an answer
                longer than data.max-length has one too)
``dup``         max word-3-gram Jaccard with a more complete     low       duplicate
                (longer, or equal and earlier) sample of the
                same site (text only, no model)
``overlap``     share of the question's content words (3+        high      answer unrelated to question
                letters, not a common English function word)     (not in the default: qa-sim
                that the answer uses (text only, no model)                 ranks it better)
``qa-sim``      cosine of the question's and the answer's        high      answer unrelated to question
                sentence embeddings (``selection.embedding-
                model``, default all-MiniLM-L6-v2, a 22M
                encoder trained on question-answer pairs)
==============  ==============================================  ========  ==========================

The server computes every signal for the anchors from their records (``clues``
leave-one-out as the engine does; ``dup`` within the anchor set) and sends per-signal
robust location and spread (median, 1.4826 MAD) of the oriented values (``oriented``:
higher is better, ``eos`` in log units) with the anchors' values. A site refines each
signal's clean model with its own pool (``refine``), turns a sample's signals into
standard deviations ``z_j`` under it (0 = typical clean, negative = worse) and reports
only ``combine``: log10 of the share of clean samples whose summed squared shortfall
``sum_j min(z_j, 0)^2`` is as large. ``reasons`` names the signals that put a dropped
sample below the threshold.

Plain numpy/torch: no Flower imports.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import logsumexp
from scipy.stats import chi2

from clues_fl.config import DEFAULT_SIGNALS  # noqa: F401  (re-exported: the benchmarks and tests read it here)
from clues_fl.model.forward import sample_losses

# name -> (direction: +1 higher is better / -1 lower is better, reason when it is the worst)
SIGNALS: dict[str, tuple[int, str]] = {
    "clues": (+1, "off-domain"),
    "domain": (+1, "off-domain"),
    "loss": (-1, "garbled"),
    "learn": (+1, "garbled"),
    "base-loss": (-1, "garbled"),
    "qinfo": (+1, "answer unrelated to question"),
    "eos": (-1, "truncated"),
    "dup": (-1, "duplicate"),
    "overlap": (+1, "answer unrelated to question"),
    "qa-sim": (+1, "answer unrelated to question"),
}


@dataclass(frozen=True)
class Signal:
    """Your own signal for `clues+` (`selection.signals = "clues,dup,mypkg.signals:name"`):
    `compute(samples)` gives one value per sample (a site's pool, or the anchors on the
    server; each has `.question` and `.answer`), `direction` +1 when higher is better and
    -1 when lower is, `reason` the words a dropped sample's report gives when this signal
    put it low. It runs where the data is: at each site, which must have your package. The
    `signal` decorator makes one from a function."""

    direction: int
    reason: str
    compute: Callable[[Sequence], Sequence[float]]

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise ValueError(f"a signal's direction is +1 (higher is better) or -1, got {self.direction!r}")


def signal(*, direction: int, reason: str) -> Callable[[Callable], Signal]:
    """Decorator: `@signal(direction=-1, reason="too long")` over `def f(samples)`."""
    return lambda compute: Signal(direction, reason, compute)


def _user_signal(name: str) -> Signal:
    from clues_fl import plugins

    return plugins.load(name, "selection.signals", accepts=lambda obj: isinstance(obj, Signal),
                        expected="a clues_fl.scoring.signals.Signal (the @signal decorator)")


def direction_and_reason(name: str) -> tuple[int, str]:
    """A signal's direction and reason words: a built-in's (SIGNALS) or yours (module:attr)."""
    if name in SIGNALS:
        return SIGNALS[name]
    user = _user_signal(name)
    return user.direction, user.reason


MAD_SCALE = 1.4826  # MAD -> sd for a normal distribution
# Smallest spread per signal, in the signal's own units: anchors are (nearly) never
# near-duplicates of each other, so their dup spread is ~0 and any shared phrase would
# look like a many-sigma outlier; a 0.15 Jaccard spread puts a near-copy (Jaccard ~0.9)
# at about -6 and a shared phrase (0.1) at about -0.7. Measured on the two quick pools
# (benchmarks/signals.py): 0.3 -> near-duplicate AUC 0.88/0.89, 0.15 -> 0.96/0.95 at a cost
# of at most 0.007 on any other kind; 0.1 ranks near-copies a little better still, but
# makes a clean answer that shares a stock phrase with another one a 1-2 sigma outlier.
MIN_SPREAD = {"dup": 0.15}
Z_FLOOR = -50.0  # a signal cannot push a score below this (keeps histograms and plots readable)


# --------------------------------------------------------------------------- model passes


@torch.no_grad()
def token_loss_stats(model, encoded: Sequence, first_layer: int, *, pad_id: int, batch_size: int = 8,
                     cache=None) -> tuple[np.ndarray, np.ndarray]:
    """(mean answer-token loss, loss of the LAST answer token) of every sample.

    ``data.encode_sample`` appends the end-of-turn token to every answer, so the last
    answer token is the end of the answer, except for a sample cut at
    ``data.max-length`` (``Encoded.truncated``), whose last-token loss is NaN here.
    Both go through ``forward.sample_losses`` (whatever forward the model family uses);
    the second with a target mask holding only the last answer position.
    """
    from clues_fl.model.device import device_of
    from clues_fl.model.forward import iterate_batches

    mean = np.zeros(len(encoded))
    last = np.full(len(encoded), np.nan)
    for batch in iterate_batches(encoded, batch_size, pad_id, cache, device_of(model)):
        mean[batch.rows] = sample_losses(model, batch, first_layer).double().cpu().numpy()
        ends = batch.attention_mask.sum(1) - 2  # the position predicting the last real token
        only_last = torch.zeros_like(batch.target_mask)
        only_last[torch.arange(batch.size, device=only_last.device), ends.clamp(min=0)] = True
        only_last &= batch.target_mask
        end_loss = sample_losses(model, replace(batch, target_mask=only_last), first_layer).double().cpu().numpy()
        for b, row in enumerate(batch.rows):
            if only_last[b].any() and not encoded[row].truncated:
                last[row] = end_loss[b]
    return mean, last


def encode_answer_ends(tokenizer, samples, max_length: int, system_prompt: str | None = None) -> list:
    """Each answer's END after an empty user turn: the chat header, then the answer's last
    tokens up to `max_length` with the end-of-turn token. The end-of-answer signal reads the
    loss of that last token; taking the end (not the start, as the training encoding does
    when it cuts) gives every sample and anchor a value, also when its answer is long."""
    from clues_fl.data.sources import Encoded, Sample, encode_sample
    from clues_fl.scoring.baselines import empty_turn_header

    header = empty_turn_header(tokenizer, system_prompt)
    out = []
    for s in samples:
        full = encode_sample(tokenizer, Sample(s.id, "", s.answer), 10**9, system_prompt)  # the whole answer + end
        answer = list(full.input_ids[full.prompt_len :])[-max(1, max_length - len(header)) :]
        out.append(Encoded(s.id, header + answer, len(header), False))
    return out


# --------------------------------------------------------------------------- text signal

_TOKEN = re.compile(r"\w+")


# Near-duplicates are pairs of answers whose word 3-grams overlap by at least this Jaccard
# similarity; a weaker overlap counts as none (0). Below it, the similarity is that of
# shared stock phrases, which every answer has with some other in a large pool (on the
# Fiqa answers: 99% of them, median 0.008); above it, the exact search is sub-quadratic
# (prefix filtering). See near_duplicate_scores and docs/scale.md.
NEAR_DUPLICATE_MIN_JACCARD = 0.2


def near_duplicate_scores(texts: Sequence[str], *, min_jaccard: float = NEAR_DUPLICATE_MIN_JACCARD) -> np.ndarray:
    """For each text, the largest Jaccard similarity of its word 3-grams with a text of
    the same set that is kept before it: a longer one (more complete: a near-copy that
    lost words is the copy), or an equally long earlier one (an exact copy); 0 where no
    such text reaches `min_jaccard`. So a group of near-copies keeps its most complete
    member.

    Exact, not sampled: every pair at or above `min_jaccard` is found (prefix filtering,
    Chaudhuri et al. 2006) and its similarity computed from the 3-gram sets. Texts with
    identical 3-gram sets are first grouped (each member but the kept one scores 1, the
    most any pair can give); then, with the 3-grams ordered rarest first, a pair with
    Jaccard >= t shares at least ceil(t |A|) 3-grams of A, so one of them lies among the
    first |A| - ceil(t |A|) + 1 of A and likewise of B: only pairs sharing a 3-gram of
    these prefixes (and whose sizes allow t) are compared. Common phrases sit at the end
    of the order and bring no pairs, so the work grows with the pairs that share rare
    3-grams, not with all pairs. min_jaccard = 0 compares every pair sharing a 3-gram."""
    from scipy import sparse

    if not 0 <= min_jaccard <= 1:
        raise ValueError(f"min_jaccard must be in [0, 1], got {min_jaccard}")
    keys, owner, sizes = _shingle_ids(texts)
    n = len(texts)
    out = np.zeros(n)
    if not len(keys):
        return out
    counts = np.bincount(owner, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)])
    # identical 3-gram sets: the longest (then first) member is kept, the others score 1
    groups: dict[bytes, int] = {}
    keep = np.zeros(n, dtype=bool)
    for i in np.argsort(-sizes, kind="stable"):
        if counts[i] == 0:
            continue
        digest = hashlib.blake2b(keys[starts[i] : starts[i + 1]].tobytes(), digest_size=16).digest()
        if digest in groups:
            out[i] = 1.0
        else:
            groups[digest] = i
            keep[i] = True
    del groups
    docs = np.flatnonzero(keep)  # in text order
    if len(docs) < 2:
        return out
    # the kept texts' 3-grams (grouped by text already), ranked rarest first (ties by id:
    # one global order), as a sparse text x 3-gram matrix
    mine = None if keep.all() else keep[owner]
    del owner
    if mine is not None:
        keys = keys[mine]
        del mine
    cols, distinct = _dense_ids(keys)  # 3-gram -> 0 .. distinct - 1
    del keys
    rank = np.empty(distinct, dtype=np.int32)  # a stable sort by count: ties by id
    rank[np.argsort(np.bincount(cols, minlength=distinct).astype(np.int32), kind="stable")] = np.arange(
        distinct, dtype=np.int32)
    set_size = counts[docs]
    indptr = np.concatenate([[0], np.cumsum(set_size)])
    # 0/1 entries in one byte each (a row's 3-grams are distinct; sparse sums are taken in int64)
    full = sparse.csr_matrix((np.ones(len(cols), dtype=np.int8), rank[cols], indptr), shape=(len(docs), distinct))
    del cols, rank
    full.sort_indices()  # each row's 3-grams rarest first
    need = np.ceil(min_jaccard * set_size - 1e-9).astype(np.int64) if min_jaccard > 0 else np.ones_like(set_size)
    prefix_len = set_size - np.maximum(need, 1) + 1
    index = np.int64 if full.nnz >= 2**31 else np.int32
    position = np.arange(full.nnz, dtype=index) - np.repeat(indptr[:-1].astype(index), set_size)
    take = position < np.repeat(prefix_len.astype(index), set_size)
    del position
    prefix = sparse.csr_matrix((np.ones(int(take.sum()), dtype=bool), full.indices[take],
                                np.concatenate([[0], np.cumsum(prefix_len)])), shape=full.shape)
    del take
    prefix_t = prefix.T.tocsr()
    block = 2048
    for lo in range(0, len(docs), block):
        shared = (prefix[lo : lo + block] @ prefix_t).tocoo()  # pairs sharing a prefix 3-gram
        a, b = shared.row + lo, shared.col
        pick = a < b  # each pair once
        a, b = a[pick], b[pick]
        small, large = np.minimum(set_size[a], set_size[b]), np.maximum(set_size[a], set_size[b])
        pick = small >= min_jaccard * large - 1e-9  # J <= |smaller| / |larger|
        a, b = a[pick], b[pick]
        for c in range(0, len(a), 1 << 14):  # 16,384 pairs at a time: their rows are copied here
            pa, pb = a[c : c + (1 << 14)], b[c : c + (1 << 14)]
            inter = np.asarray(full[pa].multiply(full[pb]).sum(axis=1)).ravel()
            sim = inter / (set_size[pa] + set_size[pb] - inter)
            hit = (sim >= min_jaccard) & (inter > 0)
            i, j = docs[pa[hit]], docs[pb[hit]]  # i < j: texts in order
            later = np.where(sizes[i] < sizes[j], i, j)  # the shorter one, or the later of two equal
            np.maximum.at(out, later, sim[hit])
    return out


def _dense_ids(keys: np.ndarray, chunk: int = 1 << 20) -> tuple[np.ndarray, int]:
    """(int32 number of each key among the distinct keys, how many distinct), as
    np.unique's inverse but with one sort, 4-byte numbers and no sorted copy of the keys
    (neighbours in sorted order compared `chunk` at a time)."""
    order = np.argsort(keys, kind="stable")
    fresh = np.empty(len(keys), dtype=bool)
    fresh[:1] = True
    for lo in range(1, len(keys), chunk):
        hi = min(lo + chunk, len(keys))
        np.not_equal(keys[order[lo:hi]], keys[order[lo - 1 : hi - 1]], out=fresh[lo:hi])
    numbers = np.cumsum(fresh, dtype=np.int32)
    del fresh
    numbers -= 1
    distinct = int(numbers[-1]) + 1 if len(numbers) else 0
    out = np.empty(len(keys), dtype=np.int32)
    out[order] = numbers
    return out, distinct


_PACKED_KEYS = 2**63  # three word numbers fit one int64 below this


def _shingle_ids(texts: Sequence[str], chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every text's set of word 3-grams of its lower-cased words (a text of 1-2 words: its
    words as one shingle) as exact integer ids: (ids, the text of each id, word count per
    text), grouped by text and sorted within it. Words are numbered; a 3-gram is its three
    numbers (0 for a missing word: a 1-2 word shingle is never a 3-gram). The words are
    held as 4-byte numbers and the 3-grams made `chunk` texts at a time."""
    import itertools
    from array import array
    from collections import defaultdict

    number = defaultdict(itertools.count(1).__next__)  # word -> 1, 2, ... in order of appearance
    words, lengths = array("i"), np.zeros(len(texts), dtype=np.int64)
    sizes = np.zeros(len(texts), dtype=np.int64)
    for k, text in enumerate(texts):
        found = _TOKEN.findall(text.lower())
        words.extend(map(number.__getitem__, found))
        lengths[k] = len(found)
        # the text's own words (lower() can split a word in two outside ASCII)
        sizes[k] = len(found) if text.isascii() else len(_TOKEN.findall(text))
    flat = np.frombuffer(words, dtype=np.int32) if len(words) else np.zeros(0, dtype=np.int32)
    base = len(number) + 1
    packed = base**3 < _PACKED_KEYS
    starts = np.concatenate([[0], np.cumsum(lengths)])
    keys = np.empty(max(len(flat), 1), dtype=np.int64)  # at most one 3-gram per word
    owners = np.empty(len(keys), dtype=np.int32)
    filled, grams_all, owners_all = 0, [], []
    for lo in range(0, len(texts), chunk):
        hi = min(lo + chunk, len(texts))
        part = flat[starts[lo] : starts[hi]].astype(np.int64)
        owner = np.repeat(np.arange(lo, hi, dtype=np.int32), lengths[lo:hi])
        pos = np.arange(max(len(part) - 2, 0))
        whole = pos[owner[pos] == owner[pos + 2]]  # 3-grams inside one text
        grams = np.stack([part[whole], part[whole + 1], part[whole + 2]], axis=1)
        short = np.flatnonzero((lengths[lo:hi] > 0) & (lengths[lo:hi] < 3))  # 1-2 words, 0-padded
        first = starts[lo:hi][short] - starts[lo]
        few = np.zeros((len(short), 3), dtype=np.int64)
        few[:, 0] = part[first]
        two = lengths[lo:hi][short] == 2
        few[two, 1] = part[first[two] + 1]
        grams, owner = np.concatenate([grams, few]), np.concatenate([owner[whole], (short + lo).astype(np.int32)])
        if not packed:  # too many distinct words to pack three in 63 bits: numbered below
            grams_all.append(grams)
            owners_all.append(owner)
            continue
        key = (grams[:, 0] * base + grams[:, 1]) * base + grams[:, 2]
        order = np.lexsort((key, owner))
        key, owner = key[order], owner[order]
        new = np.ones(len(key), dtype=bool)
        new[1:] = (key[1:] != key[:-1]) | (owner[1:] != owner[:-1])
        count = int(new.sum())
        keys[filled : filled + count] = key[new]
        owners[filled : filled + count] = owner[new]
        filled += count
    if not packed and grams_all:
        grams, owner = np.concatenate(grams_all), np.concatenate(owners_all)
        key = np.unique(grams, axis=0, return_inverse=True)[1].ravel().astype(np.int64)
        unique = np.unique(np.stack([owner.astype(np.int64), key], axis=1), axis=0)
        return unique[:, 1].copy(), unique[:, 0].astype(np.int32), sizes
    return keys[:filled], owners[:filled], sizes


_FUNCTION_WORDS = frozenset(
    "the and for are you your that this with from not but can does will would should could have has had "
    "was were what how why when which who".split())


def question_overlap(samples) -> np.ndarray:
    """Share of each question's content words (3+ letters, not a common English function
    word) that its answer uses; NaN for a question without any (it then counts as typical).
    An answer written for another question shares few of them."""
    out = np.full(len(samples), np.nan)
    for i, s in enumerate(samples):
        question = {w for w in _TOKEN.findall(s.question.lower()) if len(w) >= 3 and w not in _FUNCTION_WORDS}
        if question:
            answer = set(_TOKEN.findall(s.answer.lower()))
            out[i] = len(question & answer) / len(question)
    return out


def question_answer_similarity(samples, encoder: str, device=None) -> np.ndarray:
    """Cosine of each sample's question and answer embeddings under the sentence encoder
    `encoder` (model/sentence_encoder.py). An answer written for another question, even
    one in the same domain and vocabulary, lies further from its question than a real
    answer does; unlike ``overlap`` it also sees paraphrase and synonyms."""
    from clues_fl.model.sentence_encoder import paired_cosines

    return paired_cosines([s.question for s in samples], [s.answer for s in samples], encoder, device=device)


def question_signals(samples, encoder: str, *, names: Sequence[str], domain_centre=None, device=None,
                     chunk: int = 4096) -> dict[str, np.ndarray]:
    """``qa-sim`` and ``domain`` (those of `names`) from one pass of the sentence encoder
    over the questions (and, for ``qa-sim``, the answers), `chunk` samples at a time (so a
    site holds no more than a chunk's embeddings). ``domain``: the cosine of each
    question's embedding with `domain_centre` (domain_centre_of the anchors); without one,
    with the mean of the other samples' (the anchors' leave-one-out, as ``clues``). A
    question from another domain lies far from the anchors' questions whatever its
    answer."""
    from clues_fl.model.sentence_encoder import embed_texts

    out = {n: np.zeros(len(samples)) for n in ("qa-sim", "domain") if n in names}
    if not out:
        return out
    questions = [s.question for s in samples]
    centre = None if domain_centre is None else np.asarray(domain_centre, dtype=np.float64)
    held = []  # without a centre (the anchors, a small set): every question embedding, for leave-one-out
    for start in range(0, len(samples), chunk):
        q = embed_texts(questions[start : start + chunk], encoder, device=device).astype(np.float64)
        if "qa-sim" in out:
            a = embed_texts([s.answer for s in samples[start : start + chunk]], encoder, device=device)
            out["qa-sim"][start : start + chunk] = (q * a).sum(axis=1)
        if "domain" in out and centre is None:
            held.append(q)
        elif "domain" in out:
            out["domain"][start : start + chunk] = q @ centre
    if held:
        out["domain"] = leave_one_out_cosines(np.vstack(held))
    return out


def leave_one_out_cosines(emb: np.ndarray) -> np.ndarray:
    """(N,) cosine of each unit row with the mean of the other rows."""
    total = emb.sum(axis=0)
    others = total[None, :] - emb
    norms = np.maximum(np.linalg.norm(others, axis=1), 1e-12)
    return (emb * others).sum(axis=1) / norms


def domain_centre_of(samples, encoder: str, device=None) -> np.ndarray:
    """The anchors' mean question embedding, unit length: what a site's ``domain`` signal
    compares its questions with (the server sends it; it is made of public anchors only)."""
    from clues_fl.model.sentence_encoder import embed_texts

    return mean_direction(embed_texts([s.question for s in samples], encoder, device=device))


def mean_direction(emb: np.ndarray) -> np.ndarray:
    """The unit vector along the sum of the rows of `emb` (float64)."""
    total = np.asarray(emb, dtype=np.float64).sum(axis=0)
    return total / max(float(np.linalg.norm(total)), 1e-12)


def sample_texts(samples) -> list[str]:
    """The text the duplicate signal compares: the answer (a near-copy keeps it; the
    server knows only the anchors' encoded answers)."""
    return [s.answer for s in samples]


# --------------------------------------------------------------------------- all signals


def compute_signals(bench, samples, encoded, cfg, *, clues_scores: np.ndarray, losses: np.ndarray,
                    cache=None, names: Sequence[str] = tuple(SIGNALS), domain_centre=None) -> dict[str, np.ndarray]:
    """Every signal of `names` for these samples (a site's pool, or the anchors on the
    server). `clues_scores` (N,) and `losses` (K, N) come from the scoring pass (the
    engine's ScoreResult; for anchors the leave-one-out scores and their per-checkpoint
    losses). Costs one base-model forward (with the prefix cache), for ``qinfo`` one over
    the answers alone, for ``eos`` one over the answers' ends, and for ``qa-sim`` and
    ``domain`` one of the sentence encoder over the questions (and the answers, for
    ``qa-sim``). ``domain`` compares with `domain_centre` (a site: the Calibration's), or
    without one each sample with the others (the anchors, leave-one-out)."""
    from clues_fl.model.device import device_of
    from clues_fl.model.loading import load_lora_state
    from clues_fl.scoring.baselines import answer_losses_of, encode_answer_only

    names = tuple(names)
    out: dict[str, np.ndarray] = {}
    losses = np.atleast_2d(np.asarray(losses, dtype=float))
    if "clues" in names:
        out["clues"] = np.asarray(clues_scores, dtype=float)
    if "loss" in names:
        out["loss"] = losses[-1]
    if "learn" in names:
        out["learn"] = losses[0] - losses[-1]
    bs = cfg.scoring.batch_size
    if {"base-loss", "qinfo", "eos"} & set(names):
        load_lora_state(bench.model, bench.initial_state)  # LoRA B = 0: the base model
    system = cfg.data.system_prompt or None
    end_loss = np.full(len(samples), np.nan)
    if {"base-loss", "qinfo"} & set(names):
        base = answer_losses_of(bench.model, encoded, bench.first_layer, pad_id=bench.pad_id, batch_size=bs,
                                cache=cache, desc="base model")
        out["base-loss"] = base
        if "qinfo" in names:
            alone = encode_answer_only(bench.tokenizer, encoded, system)
            # An answer that fits is the same sequence as its end encoding, so this pass
            # also gives its end-token loss (NaN for the cut ones).
            alone_loss, end_loss = token_loss_stats(bench.model, alone, bench.first_layer, pad_id=bench.pad_id,
                                                    batch_size=bs)
            out["qinfo"] = alone_loss - base
    if "eos" in names:
        rows = np.flatnonzero(np.isnan(end_loss))
        if rows.size:
            ends = encode_answer_ends(bench.tokenizer, [samples[i] for i in rows], cfg.data.max_length, system)
            end_loss[rows] = token_loss_stats(bench.model, ends, bench.first_layer, pad_id=bench.pad_id,
                                              batch_size=bs)[1]
        out["eos"] = end_loss
    if "dup" in names:
        out["dup"] = near_duplicate_scores(sample_texts(samples))
    if "overlap" in names:
        out["overlap"] = question_overlap(samples)
    if {"qa-sim", "domain"} & set(names):
        out.update(question_signals(samples, cfg.selection.embedding_model, names=names,
                                    domain_centre=domain_centre, device=device_of(bench.model)))
    for name in names:
        if name not in SIGNALS:  # yours: module:attr
            values = np.asarray(_user_signal(name).compute(samples), dtype=float).reshape(-1)
            if values.size != len(samples):
                raise ValueError(f"selection.signals: '{name}' gave {values.size} values for {len(samples)} samples")
            out[name] = values
    return {n: out[n] for n in names}


def checkpoint_losses(bench, encoded, checkpoints, *, batch_size: int = 8, cache=None) -> np.ndarray:
    """(K, N) answer losses at each checkpoint (the server's pass over the anchors; a
    site gets them from its scoring pass)."""
    from clues_fl.scoring.baselines import answer_losses_of
    from clues_fl.model.loading import load_lora_state

    out = np.zeros((len(checkpoints), len(encoded)))
    for k, ckpt in enumerate(checkpoints):
        load_lora_state(bench.model, ckpt.state)
        out[k] = answer_losses_of(bench.model, encoded, bench.first_layer, pad_id=bench.pad_id,
                                  batch_size=batch_size, cache=cache)
    return out


# --------------------------------------------------------------------------- calibration


# Signals read on a log scale: the end-token loss of clean answers has a long upper tail
# (answers whose source text ends in a list's colon or a link: 4 of the 48 clean samples
# of the suite's quick pool have an end loss of 10-16 nats against a median of 2.5), which
# in loss units buries every other signal's shortfall under theirs.
LOG_SCALE = frozenset({"eos"})
# Anchor quantiles at which a site cuts its own pool to refine each signal's clean model
# (refine): the pool's values above the cut are mostly clean on that signal.
REFINE_QUANTILES = (0.3, 0.4, 0.5)
# How much each anchor counts in that fit beside one of the site's own values. The anchors
# are another sample than the site's clean data, and on some draws of 16 they sit lower and
# wider than it on a signal (the question-answer similarity of suite-11 and the quick pool:
# median 0.46-0.51 and spread 0.15-0.24 on three draws of five, the sites' clean answers
# 0.53-0.59 and 0.08-0.14); counted once each they pull the site's model with them. Over five
# draws on four pools (benchmarks/selection_draws.py; docs/selection.md, "The combined score
# over anchor draws") 0.25-0.35 cut the F1's spread over the draws on every pool (e.g.
# suite-11 0.060 -> 0.041, 100 samples a site 0.069 -> 0.035) at about the same mean F1
# (within 0.008); at 0.2 and below the clean drops rose on the small pools.
REFINE_ANCHOR_WEIGHT = 0.3


def oriented(name: str, values) -> np.ndarray:
    """A signal's values on the scale its clean model is fitted on: higher is better,
    LOG_SCALE signals in log units; NaN (a value the sample does not have) stays NaN."""
    v = np.asarray(values, dtype=float)
    if name in LOG_SCALE:
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.log(np.maximum(v, 1e-6))
    return direction_and_reason(name)[0] * v


@dataclass
class Calibration:
    """Per signal, the clean model of its oriented values (oriented): a normal
    distribution with location `centre` and scale `spread`, and the public anchors'
    oriented values it came from (`anchors`, signals x anchors; a site refines the model
    with its own pool, refine)."""

    names: tuple[str, ...]
    centre: np.ndarray
    spread: np.ndarray
    anchors: np.ndarray
    domain_centre: np.ndarray | None = None  # the anchors' mean question embedding (``domain``)

    def to_config(self) -> dict:
        config = {"signals": list(self.names), "signal-centre": [float(x) for x in self.centre],
                  "signal-spread": [float(x) for x in self.spread],
                  "signal-anchors": [float(x) for x in np.nan_to_num(self.anchors, nan=np.inf).ravel()]}
        if self.domain_centre is not None:
            config["signal-domain-centre"] = [float(x) for x in self.domain_centre]
        return config

    @classmethod
    def from_config(cls, config) -> Calibration:
        names = tuple(str(n) for n in config["signals"])
        anchors = np.asarray([float(x) for x in config["signal-anchors"]]).reshape(len(names), -1)
        centre = config["signal-domain-centre"] if "signal-domain-centre" in config else None
        return cls(names, np.asarray([float(x) for x in config["signal-centre"]]),
                   np.asarray([float(x) for x in config["signal-spread"]]),
                   np.where(np.isinf(anchors), np.nan, anchors),
                   None if centre is None else np.asarray([float(x) for x in centre]))


def _robust(values: np.ndarray, floor: float = 0.0) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    centre = float(np.median(v))
    spread = MAD_SCALE * float(np.median(np.abs(v - centre)))
    if not spread > 0:  # ties (e.g. no anchor has a near-duplicate): fall back on the sd, then a floor
        spread = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    if not spread > 0:
        spread = max(abs(centre) * 0.05, 1e-3)
    return centre, max(spread, floor)


def calibrate(anchor_signals: dict[str, np.ndarray]) -> Calibration:
    """The clean model from the anchors alone: per signal the median and 1.4826 MAD of
    their oriented values (MIN_SPREAD as a floor)."""
    names = tuple(anchor_signals)
    values = np.vstack([oriented(n, anchor_signals[n]) for n in names])
    stats = [_robust(row, MIN_SPREAD.get(n, 0.0)) for n, row in zip(names, values)]
    return Calibration(names, np.array([c for c, _ in stats]), np.array([s for _, s in stats]), values)


def refine(cal: Calibration, signals: dict[str, np.ndarray], quantiles=REFINE_QUANTILES,
           anchor_weight: float = REFINE_ANCHOR_WEIGHT) -> Calibration:
    """The clean model refitted with a pool's own values (a site's samples): per signal a
    normal distribution fitted jointly to the anchors (all of them, each counting
    `anchor_weight`, REFINE_ANCHOR_WEIGHT) and to the pool's values above a cut at an
    anchor quantile (a truncated normal: the pool's clean samples
    and the bad kinds this signal does not see; the kinds it sees lie below the cut), the
    fits at the cuts `quantiles` averaged (selection.rules.mixture_threshold's censored
    fit, per signal). The pool is 10-100 times the anchor set, so location and spread
    swing less with which anchors were drawn; a pool far below the anchors leaves few
    values above the cut, and the anchors keep the fit where it was."""
    from clues_fl.selection.rules import _fit_good

    centre, spread = cal.centre.copy(), cal.spread.copy()
    for j, name in enumerate(cal.names):
        anchors = cal.anchors[j][np.isfinite(cal.anchors[j])]
        pool = oriented(name, signals[name])
        pool = pool[np.isfinite(pool)]
        if anchors.size < 2 or pool.size == 0:
            continue
        za, zp = (anchors - cal.centre[j]) / cal.spread[j], (pool - cal.centre[j]) / cal.spread[j]
        fits = [_fit_good(za, zp, float(np.quantile(za, q)), anchor_weight) for q in quantiles]
        centre[j] = cal.centre[j] + cal.spread[j] * float(np.mean([f[0] for f in fits]))
        spread[j] = max(cal.spread[j] * float(np.mean([f[1] for f in fits])), MIN_SPREAD.get(name, 0.0))
    return replace(cal, centre=centre, spread=spread)


def standardised(signals: dict[str, np.ndarray], cal: Calibration) -> np.ndarray:
    """(S, N) standard deviations under the clean model: 0 = a typical clean sample,
    negative = worse. A missing value (NaN, e.g. the end token of a sample cut at
    max-length) counts as typical (0)."""
    rows = []
    for name, centre, spread in zip(cal.names, cal.centre, cal.spread):
        z = (oriented(name, signals[name]) - centre) / spread
        rows.append(np.clip(np.nan_to_num(z, nan=0.0), Z_FLOOR, -Z_FLOOR))
    return np.vstack(rows)


def _log_shortfall_tail(r2, k: int) -> np.ndarray:
    """Natural log of P(sum_j min(z_j, 0)^2 >= r2) for k independent standard normal z_j:
    m ~ Binomial(k, 1/2) of them fall short, and the sum of m squared shortfalls is
    chi-square with m degrees of freedom."""
    r2 = np.asarray(r2, dtype=float)
    terms = [math.log(math.comb(k, m)) - k * math.log(2) + chi2.logsf(r2, m) for m in range(1, k + 1)]
    return np.where(r2 > 0, logsumexp(np.stack(terms), axis=0), 0.0)


def shortfalls(z: np.ndarray) -> np.ndarray:
    """Each sample's squared shortfalls summed over signals, sum_j min(z_j, 0)^2."""
    return (np.minimum(np.atleast_2d(np.asarray(z, dtype=float)), 0.0) ** 2).sum(axis=0)


def combine(z: np.ndarray) -> np.ndarray:
    """log10 of the share of clean samples that would fall as far short of the clean model
    as this one: with k signals and r^2 = sum_j min(z_j, 0)^2, ``P(R^2 >= r^2)`` for
    independent standard normal z_j (a mixture of chi-square tails, _log_shortfall_tail).
    Clean samples score about log10 of a uniform number (0 = nowhere short, -1.3 = worse
    than 95% of clean ones). Squares, not the plain sum of shortfalls: one signal far out
    outweighs several a little short, so a signal that does not see a kind adds little
    noise to the one that does, while a kind that several signals see (another domain)
    still adds up (docs/selection.md, "Calibration over anchor draws")."""
    z = np.atleast_2d(np.asarray(z, dtype=float))
    return _log_shortfall_tail(shortfalls(z), z.shape[0]) / math.log(10)


def shortfall_threshold(threshold: float, k: int) -> float:
    """The summed squared shortfall r^2 at which the combined score (combine, k signals)
    equals `threshold`: a sample is below the threshold exactly when its r^2 is above."""
    target = float(threshold) * math.log(10)
    if not target < 0:
        return 0.0
    high = 1.0
    while _log_shortfall_tail(high, k) > target:
        high *= 2
    return float(brentq(lambda r2: float(_log_shortfall_tail(r2, k)) - target, 0.0, high, xtol=1e-10))


def clean_reference(size: int) -> np.ndarray:
    """The combined score of clean data at `size` evenly spaced quantiles: under the clean
    model it is log10 of a uniform number, whatever the signals. The server sends it as
    the threshold rules' picture of clean scores (AnchorSide.scores) in place of the
    anchors' own scores, which 16 anchors give only coarsely."""
    return np.log10((np.arange(size) + 0.5) / size)


def calibrated_scores(signals: dict[str, np.ndarray], cal: Calibration,
                      pool_refined: bool = True) -> tuple[np.ndarray, np.ndarray, Calibration]:
    """(combined score (N,), per-signal z (S, N), the calibration used): the clean model
    refined with these samples (refine; a site's pool) unless `pool_refined` is False."""
    if pool_refined:
        cal = refine(cal, signals)
    z = standardised(signals, cal)
    return combine(z), z, cal


# A signal this far below its clean model (the clean model's 2.3% tail) is named in a
# dropped sample's reason even where others' shortfalls alone would have put it below the
# threshold: a sample from another domain also ends and reads unlike the anchors, and
# naming only the largest shortfalls would call it truncated or garbled.
REASON_Z = -2.0


def reasons(z: np.ndarray, names: Sequence[str], cut: float, also_below: float = REASON_Z) -> list[list[str]]:
    """Per sample, the signals whose shortfall put it below the threshold, worst first: the
    smallest set of signals that, were they typical (z = 0), would bring its summed squared
    shortfall to `cut` (shortfall_threshold) or below, i.e. lift it to the threshold (taking
    the largest shortfalls first gives the smallest set), and with it every other signal
    at or below `also_below`; empty for a sample at or above the threshold."""
    names = list(names)
    z = np.asarray(z, dtype=float).reshape(len(names), -1)
    cut = cut + 1e-9 * max(1.0, cut)  # shortfall_threshold's root is exact to 1e-10: a sample AT the threshold is kept
    out = []
    for column in z.T:
        short = np.minimum(column, 0.0) ** 2
        left, chosen = float(short.sum()), []
        if left > cut:
            for j in np.argsort(column, kind="stable"):
                if short[j] == 0 or (left <= cut and column[j] > also_below):
                    break
                chosen.append(names[j])
                left -= short[j]
        out.append(chosen)
    return out


def reason_text(signal_names: Sequence[str]) -> str:
    """The words of a reason: each named signal's reason once, worst first ("off-domain"
    only when the gradient alignment or the domain similarity is among them)."""
    words: list[str] = []
    for name in signal_names:
        word = direction_and_reason(name)[1]
        if word not in words:
            words.append(word)
    return "; ".join(words)
