"""Property-based tests (hypothesis) of the data loader and the tokenisation invariants.

Complements tests/test_data.py (hand-picked examples) with generated files: round trips
through every file format, malformed rows at random positions, field-layout detection
and the length/truncation invariants of encode_sample.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from clues_fl.data.sources import DataError, Sample, encode_sample, load_samples

# ------------------------------------------------------------------ strategies

# Fragments that stress each format: JSON/CSV syntax, line breaks (including ones only
# str.splitlines knows), NUL, emoji (non-BMP, ZWJ sequences), non-ASCII.
SPECIAL = [
    "\n", "\r\n", "\r", '"', "'", ",", ";", "\t", "\\", "{", "}", "[", "]", ":", "  ",
    "😀", "👩‍🔬", "\u2028", "\x85", "\x00", "é", "中文", "<|im_end|>",
]
chars = st.characters(exclude_categories=("Cs",))  # every code point except surrogates
raw_text = st.lists(
    st.one_of(st.text(chars, min_size=1, max_size=8), st.sampled_from(SPECIAL)), min_size=1, max_size=6
).map("".join)
texts = raw_text.filter(lambda s: s.strip())  # the loader strips text and rejects empty text
blank_text = st.text(" \t\n\r\u3000\xa0\u2028", max_size=4)  # empty after str.strip()
id_text = st.text(chars, min_size=1, max_size=10).filter(lambda s: s.strip())
int_ids = st.integers(-(2**40), 2**40)

FORMATS = ["jsonl", "json", "csv", "parquet"]
# Location word per format in DataError messages and LoadResult.skipped.
WHERE = {"jsonl": "line", "json": "item", "csv": "row", "parquet": "row"}
SETTINGS = dict(deadline=None)


def _loc(path: Path, fmt: str, n: int) -> str:
    return f"{path} {WHERE[fmt]} {n}"


def _assert_load_contract(path: Path, expected: list, bad: list, where, no_valid: str) -> None:
    """The loader's contract for a file with good rows `expected` (id, question, answer)
    and `bad` rows (location number, field or None, reason regex): "raise" names the
    first bad row's location and field; "skip" returns exactly the good rows and
    reports exactly the bad ones (an error starting `no_valid` when none is good)."""
    if not bad:
        assert _triples(load_samples(str(path)).samples) == expected
        return
    with pytest.raises(DataError) as err:
        load_samples(str(path))
    n, field, reason = bad[0]
    message = str(err.value)
    assert message.startswith(f"{where(n)}: "), message
    assert re.search(reason, message), (reason, message)
    if field is not None:
        assert f"field '{field}'" in message
    if not expected:
        with pytest.raises(DataError, match=re.escape(no_valid)):
            load_samples(str(path), on_error="skip")
        return
    res = load_samples(str(path), on_error="skip")
    assert _triples(res.samples) == expected
    assert [w for w, _ in res.skipped] == [where(n) for n, _, _ in bad]
    for (_, why), (_, _, reason) in zip(res.skipped, bad):
        assert re.search(reason, why), (reason, why)
    assert len(res.samples) + len(res.skipped) == len(expected) + len(bad)  # nothing dropped silently


def _triples(samples: list[Sample]) -> list[tuple[str, str, str]]:
    return [(s.id, s.question, s.answer) for s in samples]


# ------------------------------------------------------------------ writers
# Each writer returns the location number the loader should give every record
# (1-based physical line for .jsonl, item for .json, data row for .csv/.parquet).


def _write_jsonl(path: Path, lines: list[bytes], draw) -> list[int]:
    """One line per entry, with random blank lines in between, CRLF and a BOM."""
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    out, numbers = [], []
    for line in lines:
        out += draw(st.lists(st.sampled_from([b"", b"  ", b"\t", b" \r"]), max_size=2))
        out.append(line)
        numbers.append(len(out))
    out += draw(st.lists(st.sampled_from([b"", b"  "]), max_size=2))
    data = eol.join(out) + (eol if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    path.write_bytes(data)
    return numbers


def _write_json(path: Path, items: list, draw) -> list[int]:
    obj = {"data": items} if draw(st.booleans()) else items
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    path.write_bytes(("\ufeff" if draw(st.booleans()) else "").encode() + text.encode("utf-8"))
    return list(range(1, len(items) + 1))


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)  # QUOTE_MINIMAL: quotes cells holding , " \r \n
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _write_parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


# ------------------------------------------------------------------ 1. round trip


@st.composite
def qa_rows(draw, fmt: str):
    """(question, answer, id or None) rows; id kinds each format can represent."""
    n = draw(st.integers(1, 8))
    modes = {
        "jsonl": ["none", "text", "int", "mixed"],
        "json": ["none", "text", "int", "mixed"],
        "csv": ["none", "text"],  # an empty CSV id cell is an error, not "no id"
        "parquet": ["none", "text", "int", "text_or_null"],
    }[fmt]
    mode = draw(st.sampled_from(modes))
    id_strategy = {
        "none": st.none(),
        "text": id_text,
        "int": int_ids,
        "mixed": st.one_of(st.none(), id_text, int_ids),
        "text_or_null": st.one_of(st.none(), id_text),
    }[mode]
    return [(draw(texts), draw(texts), draw(id_strategy)) for _ in range(n)]


def _write_rows(fmt: str, path: Path, rows: list[tuple], draw) -> list[int]:
    def record(q, a, i):
        rec = {"question": q, "answer": a}
        if i is not None:
            rec["id"] = i
        return rec

    if fmt == "jsonl":
        ensure_ascii = draw(st.booleans())
        lines = [json.dumps(record(*r), ensure_ascii=ensure_ascii).encode("utf-8") for r in rows]
        return _write_jsonl(path, lines, draw)
    if fmt == "json":
        return _write_json(path, [record(*r) for r in rows], draw)
    if fmt == "csv":
        has_id = rows[0][2] is not None
        header = ["id", "question", "answer"] if has_id else ["question", "answer"]
        body = [([i] if has_id else []) + [q, a] for q, a, i in rows]
        path.write_bytes(_csv_bytes(header, body))
        return list(range(1, len(rows) + 1))
    columns = {"question": [r[0] for r in rows], "answer": [r[1] for r in rows]}
    if any(r[2] is not None for r in rows):
        columns["id"] = [r[2] for r in rows]
    _write_parquet(path, columns)
    return list(range(1, len(rows) + 1))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), stem=st.sampled_from(["rows", "my-set.v2", "Q_A 1"]))
def test_round_trip_every_format(fmt, data, stem):
    """Arbitrary unicode rows written in each format load back verbatim (modulo the
    documented strip), in order, with their own ids or the default `<stem>-<n>`.
    Rows whose effective id repeats an earlier one are duplicates: raised at the
    second occurrence, or skipped and reported with on_error="skip"."""
    rows = data.draw(qa_rows(fmt))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stem}.{fmt}"
        numbers = _write_rows(fmt, path, rows, data.draw)
        expected, dups, seen = [], [], set()
        for (q, a, i), n in zip(rows, numbers):
            sid = str(i).strip() if i is not None else f"{stem}-{n}"
            if sid in seen:
                dups.append((n, sid))
                continue
            seen.add(sid)
            expected.append((sid, q.strip(), a.strip()))

        event("duplicate ids" if dups else "all ids unique")
        if not dups:
            res = load_samples(str(path))
            assert _triples(res.samples) == expected
            assert res.skipped == [] and res.source == str(path)
            assert all(s.domain == "" and not s.polluted and s.pollution == "" for s in res.samples)
            assert _triples(load_samples(str(path)).samples) == expected  # stable ids
            return
        with pytest.raises(DataError) as err:
            load_samples(str(path))
        n, sid = dups[0]
        assert str(err.value).startswith(f"{_loc(path, fmt, n)}: field 'id': duplicate id '{sid}' (first at ")
        res = load_samples(str(path), on_error="skip")
        assert _triples(res.samples) == expected
        assert [w for w, _ in res.skipped] == [_loc(path, fmt, n) for n, _ in dups]
        assert all("duplicate id" in reason for _, reason in res.skipped)


# ------------------------------------------------------------------ 2. malformed rows

BAD_BYTES = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"\xc0\xaf"]
ID_POOL = ["id:a", "id:b", " id:c ", "7", 7]  # small on purpose: ids collide often
JSONL_BAD_KINDS = [
    "invalid_json", "not_object", "missing", "blank", "wrong_type", "bad_utf8", "bad_id", "duplicate_id",
]


@st.composite
def bad_row(draw, kind: str, earlier_ids: list[str]):
    """(JSON value or raw line bytes, field named in the message or None, reason regex)."""
    q, a = draw(texts), draw(texts)
    field = draw(st.sampled_from(["question", "answer"]))
    if kind == "duplicate_id" and not earlier_ids:
        kind = "missing"
    if kind == "invalid_json":
        good = json.dumps({"question": q, "answer": a})
        line = draw(
            st.one_of(
                st.integers(1, len(good) - 1).map(lambda cut: good[:cut]),  # truncated object
                st.sampled_from([" x", ",", "}", "{}"]).map(lambda tail: good + tail),  # extra data
                st.sampled_from(["{not json", "{'question': 'q', 'answer': 'a'}", "question,answer", "}"]),
            )
        )
        return line.encode(), None, r"invalid JSON"
    if kind == "not_object":
        value = draw(st.sampled_from([[1, 2], [], "text", 42, 1.5, None, True]))
        return value, None, rf"expected an object, got {type(value).__name__}"
    if kind == "missing":
        rec = {"question": q, "answer": a}
        del rec[field]
        return rec, field, rf"field '{field}' is missing"
    if kind == "blank":
        return {"question": q, "answer": a, field: draw(blank_text)}, field, rf"field '{field}' is empty"
    if kind == "wrong_type":
        values = [0, -3, 2.5, True, False, None, {}, {"text": q}, [q] if field == "question" else []]
        if field == "answer":
            values.append([1, "x"])  # a list answer takes its first item, which must be text
        value = draw(st.sampled_from(values))
        return {"question": q, "answer": a, field: value}, field, rf"field '{field}' (must be text|is null|is an empty)"
    if kind == "bad_utf8":
        marker = "\ue001"
        rec = {"question": q, "answer": a, field: draw(texts) + marker + draw(st.sampled_from(["", "x", "é"]))}
        line = json.dumps(rec, ensure_ascii=True).encode().replace(b"\\ue001", draw(st.sampled_from(BAD_BYTES)))
        return line, field, rf"field '{field}' is not valid UTF-8"
    if kind == "bad_id":
        value = draw(st.sampled_from([1.5, True, [], ["x"], {"x": 1}, "", "  \t"]))
        return {"id": value, "question": q, "answer": a}, "id", r"field 'id' (must be text or an integer|is empty)"
    assert kind == "duplicate_id"
    dup = draw(st.sampled_from(earlier_ids))
    return {"id": draw(st.sampled_from([dup, f" {dup}\t"])), "question": q, "answer": a}, "id", (
        rf"field 'id': duplicate id '{re.escape(dup)}' \(first at .+\)"
    )


@settings(max_examples=100, **SETTINGS)
@given(data=st.data(), kinds=st.lists(st.sampled_from([None] * 6 + JSONL_BAD_KINDS), min_size=1, max_size=12))
def test_malformed_jsonl_rows(data, kinds):
    """Bad rows (None in `kinds` = good row) at random positions among good ones, with
    blank lines, CRLF and a BOM: raise names file, 1-based physical line of the first bad
    row and the field; skip keeps exactly the good rows and reports every bad row."""
    stem = "rows"
    entries, good_ids = [], []  # entries: (line bytes, expected triple or None, field, reason)
    for kind in kinds:
        if kind is None:
            q, a = data.draw(texts), data.draw(texts)
            rid = data.draw(st.one_of(st.none(), st.sampled_from(ID_POOL)))
            if rid is not None and str(rid).strip() in good_ids:
                rid = None  # good rows stay unique; collisions are the duplicate_id kind
            rec = {"question": q, "answer": a} | ({"id": rid} if rid is not None else {})
            entries.append([json.dumps(rec, ensure_ascii=data.draw(st.booleans())).encode(), (rid, q, a), None, None])
            if rid is not None:
                good_ids.append(str(rid).strip())
            else:
                good_ids.append(None)  # default id, known once the line number is
            continue
        value, field, reason = data.draw(bad_row(kind, [i for i in good_ids if i is not None]))
        if isinstance(value, dict) and kind not in ("bad_id", "duplicate_id") and data.draw(st.booleans()):
            # a bad row may carry any id, even one a later good row uses: it is not recorded
            value = {"id": data.draw(st.sampled_from(ID_POOL))} | value
        line = value if isinstance(value, bytes) else json.dumps(value).encode()
        entries.append([line, None, field, reason])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stem}.jsonl"
        numbers = _write_jsonl(path, [e[0] for e in entries], data.draw)
        good = [(rid, q, a, n) for (_, g, _, _), n in zip(entries, numbers) if g for rid, q, a in [g]]
        expected = [(str(rid).strip() if rid is not None else f"{stem}-{n}", q.strip(), a.strip()) for rid, q, a, n in good]
        bad = [(n, field, reason) for (_, g, field, reason), n in zip(entries, numbers) if g is None]
        event("no bad rows" if not bad else "no good rows" if not good else "good and bad rows")

        first_line = bad[0][0] if bad else 0
        _assert_load_contract(
            path, expected, bad, lambda n: f"{path} line {n}",
            f"{path}: no valid samples ({len(bad)} bad rows skipped, first: {path} line {first_line}: ",
        )


TABULAR_BAD_KINDS = {
    "json": ["missing", "blank", "wrong_type", "not_object", "bad_id", "duplicate_id"],
    "csv": ["missing", "blank", "bad_utf8", "duplicate_id"],
    "parquet": ["null", "blank", "duplicate_id"],
}


@pytest.mark.parametrize("fmt", sorted(TABULAR_BAD_KINDS))
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_malformed_rows_other_formats(fmt, data):
    """Same contract for .json (item numbers), .csv and .parquet (data row numbers, which
    multi-line CSV cells must not shift): first bad row raised with its location and
    field; skip returns the good rows and reports each bad row once."""
    kinds = data.draw(st.lists(st.sampled_from([None] * 4 + TABULAR_BAD_KINDS[fmt]), min_size=1, max_size=8))
    with_ids = data.draw(st.booleans())
    rows, effective = [], []  # rows: (record or raw value, expected triple or None, field, reason)
    for n, kind in enumerate(kinds, start=1):
        q, a = data.draw(texts), data.draw(texts)
        rid = f"r{n}" if with_ids else None
        rec = {"question": q, "answer": a} | ({"id": rid} if with_ids else {})
        if kind is None:
            sid = rid or f"data-{n}"
            rows.append((rec, (sid, q.strip(), a.strip()), None, None))
            effective.append(sid)
            continue
        field = "answer" if fmt == "csv" and kind == "missing" else data.draw(st.sampled_from(["question", "answer"]))
        if kind == "duplicate_id" and (not effective or (fmt == "csv" and not with_ids)):
            kind = "blank"
        if kind == "missing":
            rec.pop(field)
            reason = rf"field '{field}' is missing"
        elif kind == "null":
            rec[field] = None
            reason = rf"field '{field}' is null"
        elif kind == "blank":
            rec[field] = data.draw(blank_text)
            reason = rf"field '{field}' is empty"
        elif kind == "wrong_type":
            rec[field] = data.draw(st.sampled_from([3, 2.5, False, None, {"a": "b"}, [] if field == "answer" else ["q"]]))
            reason = rf"field '{field}' (must be text|is null|is an empty list)"
        elif kind == "bad_utf8":
            rec[field] = q + "\ue001"  # replaced by invalid bytes once encoded
            reason = rf"field '{field}' is not valid UTF-8"
        elif kind == "not_object":
            rec, field = data.draw(st.sampled_from([["q", "a"], "q", 1, None])), None
            reason = r"expected an object"
        elif kind == "bad_id":
            rec["id"], field = data.draw(st.sampled_from([1.5, True, ["x"], ""])), "id"
            reason = r"field 'id' (must be text or an integer|is empty)"
        else:
            rec["id"], field = data.draw(st.sampled_from(effective)), "id"
            reason = r"field 'id': duplicate id"
        rows.append((rec, None, field, reason))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{fmt}"
        records = [r[0] for r in rows]
        if fmt == "json":
            _write_json(path, records, data.draw)
        elif fmt == "csv":
            header = ["id", "question", "answer"] if any("id" in r for r in records) else ["question", "answer"]
            # a missing answer is a short row (answer is the last column)
            body = [[r[k] for k in header if k in r] for r in records]
            bad_bytes = data.draw(st.sampled_from(BAD_BYTES))
            path.write_bytes(_csv_bytes(header, body).replace("\ue001".encode(), bad_bytes))
        else:
            columns = {k: [r.get(k) for r in records] for k in ("question", "answer")}
            if any(r.get("id") is not None for r in records):
                columns["id"] = [r.get("id") for r in records]
            _write_parquet(path, columns)

        expected = [g for _, g, _, _ in rows if g]
        bad = [(n, field, reason) for n, (_, g, field, reason) in enumerate(rows, start=1) if g is None]
        _assert_load_contract(path, expected, bad, lambda n: _loc(path, fmt, n),
                              f"no valid samples ({len(bad)} bad rows skipped")


# ------------------------------------------------------------------ 3. field mapping

LAYOUTS = [("question", "answer", None), ("instruction", "output", "input"), ("prompt", "response", None)]


@st.composite
def layout_rows(draw):
    n = draw(st.integers(1, 6))
    return [(draw(texts), draw(texts), draw(st.one_of(st.none(), raw_text, blank_text))) for _ in range(n)]


def _write_records(fmt: str, path: Path, records: list[dict]) -> None:
    if fmt == "jsonl":
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    else:  # csv: every record has the same keys here
        header = list(records[0])
        path.write_bytes(_csv_bytes(header, [[r[k] for k in header] for r in records]))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@settings(max_examples=25, **SETTINGS)
@given(rows=layout_rows(), layout=st.sampled_from(LAYOUTS))
def test_auto_detected_layouts_match_canonical(fmt, rows, layout):
    """instruction/input/output and prompt/response rows load to the same samples as
    question/answer rows holding the same text (the input, when non-blank, is appended
    to the question after a blank line)."""
    qf, af, inf = layout
    with tempfile.TemporaryDirectory() as tmp:
        canonical, mapped = Path(tmp) / "a" / f"x.{fmt}", Path(tmp) / "b" / f"x.{fmt}"
        canonical.parent.mkdir()
        mapped.parent.mkdir()
        canon_records, mapped_records = [], []
        for q, a, extra in rows:
            full_q = q if inf is None or extra is None or not extra.strip() else f"{q.strip()}\n\n{extra.strip()}"
            canon_records.append({"question": full_q, "answer": a})
            rec = {qf: q, af: a}
            if inf is not None and (extra is not None or fmt == "csv"):
                rec[inf] = extra if extra is not None else ""
            mapped_records.append(rec)
        _write_records(fmt, canonical, canon_records)
        _write_records(fmt, mapped, mapped_records)
        want = load_samples(str(canonical)).samples
        got = load_samples(str(mapped)).samples
        assert got == want
        assert [(s.question, s.answer) for s in got] == [(r["question"].strip(), r["answer"].strip()) for r in canon_records]


@settings(max_examples=30, **SETTINGS)
@given(rows=layout_rows(), decoy_layout=st.sampled_from(LAYOUTS), use_input=st.booleans())
def test_explicit_fields_override_detection(rows, decoy_layout, use_input):
    """Explicit question/answer(/input) field names win over every auto-detected
    layout present in the same rows; with an explicit question field no input field is
    guessed."""
    records = []
    for q, a, extra in rows:
        rec = {name: "DECOY" for name in decoy_layout if name}
        rec |= {"my_q": q, "my_a": a, "input": "INPUT-DECOY"}
        if extra is not None:
            rec["ctx"] = extra
        records.append(rec)
    kwargs = dict(question_field="my_q", answer_field="my_a") | ({"input_field": "ctx"} if use_input else {})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        _write_records("jsonl", path, records)
        got = load_samples(str(path), **kwargs).samples
    expected = []
    for q, a, extra in rows:
        question = q.strip()
        if use_input and extra is not None and extra.strip():
            question = f"{question}\n\n{extra.strip()}"
        expected.append((question, a.strip()))
    assert [(s.question, s.answer) for s in got] == expected
    assert [s.id for s in got] == [f"x-{i}" for i in range(1, len(rows) + 1)]


# ------------------------------------------------------------------ invalid text never loads


@pytest.mark.parametrize(
    "field",
    [
        "question",
        "answer",
        "input",
        "options",
        "id",
    ],
)
@settings(max_examples=10, **SETTINGS)
@given(bad=st.sampled_from(BAD_BYTES), before=texts)
def test_bad_utf8_in_any_used_field_is_reported(field, bad, before):
    """Invalid UTF-8 in any field that ends up in a Sample (question, answer, input,
    options, id) must be a row error naming that field, never a Sample holding lone
    surrogates (which crash tokenisation and JSON/UTF-8 output later)."""
    rec = {"instruction": "q", "output": "a", "input": "i", "options": ["A", "B"], "id": "x"}
    name = {"question": "instruction", "answer": "output"}.get(field, field)
    value = before + "\ue001"
    rec[name] = [value, "B"] if field == "options" else value
    line = json.dumps(rec, ensure_ascii=True).encode().replace(b"\\ue001", bad)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_bytes(line + b"\n")
        with pytest.raises(DataError, match=re.escape(f"{path} line 1: field '{name}'")):
            load_samples(str(path))


@settings(max_examples=10, **SETTINGS)
@given(code=st.integers(0xD800, 0xDFFF), field=st.sampled_from(["question", "answer"]))
def test_lone_surrogate_escapes_are_rejected(code, field):
    """Valid JSON can still spell invalid text (`"\\ud83d"`); such rows must be
    rejected like raw bad bytes, not loaded into text the tokenizer cannot encode."""
    rec = {"question": "q", "answer": "a"}
    line = json.dumps(rec).replace(f'"{rec[field]}"', f'"x\\u{code:04x}"')
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=f"line 1: field '{field}'"):
            load_samples(str(path))


@settings(max_examples=10, **SETTINGS)
@given(junk=st.text("\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000", min_size=1, max_size=3))
def test_every_non_blank_line_is_loaded_or_reported(junk):
    """A line that is not JSON whitespace is either a sample or a skipped row."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_bytes(b'{"question": "q", "answer": "a"}\n' + junk.encode() + b"\n")
        res = load_samples(str(path), on_error="skip")
        assert len(res.samples) + len(res.skipped) == 2


# ------------------------------------------------------------------ 4. encoding invariants


@pytest.fixture(scope="module")
def tokenizers():
    from clues_fl.model.loading import load_tokenizer

    chat = load_tokenizer()
    plain = copy.deepcopy(chat)
    plain.chat_template = None
    return {"chat": chat, "plain": plain}


def _reference_ids(tok, question: str, answer: str, system_prompt: str | None) -> tuple[list[int], list[int]]:
    """Untruncated prompt and answer ids, computed independently of clues_fl.data.sources."""
    if tok.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": question})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        end = tok.convert_tokens_to_ids("<|im_end|>")
    else:
        prompt, end = f"Question: {question}\nAnswer: ", tok.eos_token_id
    return tok.encode(prompt, add_special_tokens=False), tok.encode(answer, add_special_tokens=False) + [end]


@pytest.mark.parametrize("which", ["chat", "plain"])
@settings(max_examples=40, **SETTINGS)
@given(
    question=st.one_of(texts, st.tuples(texts, st.integers(2, 30)).map(lambda t: t[0] * t[1])),
    answer=st.one_of(texts, st.tuples(texts, st.integers(2, 30)).map(lambda t: t[0] * t[1])),
    extra=st.integers(-3, 160),
    system_prompt=st.one_of(st.none(), st.text(chars, max_size=12)),
)
def test_encode_invariants(tokenizers, which, question, answer, extra, system_prompt):
    """len(input_ids) <= max_length; 0 < prompt_len < len(input_ids) (at least one answer
    token); truncated iff the full encoding is longer than max_length; untruncated
    output is exactly prompt+answer+end; truncated output keeps an answer prefix and the
    template's generation prompt. Only a max_length below the template size raises."""
    tok = tokenizers[which]
    sample = Sample("s", question, answer)
    prompt_ids, answer_ids = _reference_ids(tok, question, answer, system_prompt)
    template_len = len(_reference_ids(tok, "", "", system_prompt)[0])
    max_length = max(1, template_len + extra)  # mostly around and above the template size
    try:
        enc = encode_sample(tok, sample, max_length, system_prompt)
    except ValueError as err:
        assert f"max_length={max_length} is too small" in str(err)
        assert max_length < template_len + 4
        event("max_length too small")
        return
    full = prompt_ids + answer_ids
    assert enc.id == "s"
    assert len(enc.input_ids) <= max_length
    assert 0 < enc.prompt_len < len(enc.input_ids)
    assert enc.truncated == (len(full) > max_length)
    event("truncated" if enc.truncated else "untruncated")
    if not enc.truncated:
        assert enc.input_ids == full and enc.prompt_len == len(prompt_ids)
        return
    kept_answer = enc.input_ids[enc.prompt_len :]
    assert kept_answer == answer_ids[: len(kept_answer)]
    if which == "chat":
        tail = tok.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        assert enc.input_ids[enc.prompt_len - len(tail) : enc.prompt_len] == tail
