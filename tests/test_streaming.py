"""Steps whose input grows with a site's pool hold no more than they must: the pool's
token ids share their int objects, sentence embeddings are paired chunk by chunk with
the values of the whole lists."""

from __future__ import annotations

import numpy as np

from clues_fl.data.sources import Sample, encode_samples
from clues_fl.model.sentence_encoder import embed_texts, paired_cosines


def test_paired_cosines_chunk_by_chunk_equal_the_whole_lists():
    questions = [f"what does clause {i} of the contract say about fees" for i in range(7)]
    answers = [f"clause {i} sets a fee of {i * 10} dollars a month" if i % 2 else "the sky is blue" for i in range(7)]
    whole = (embed_texts(questions).astype(np.float64) * embed_texts(answers)).sum(axis=1)
    np.testing.assert_array_equal(paired_cosines(questions, answers, chunk=2 * 32), whole)
    np.testing.assert_allclose(paired_cosines(questions, answers, chunk=3), whole, atol=1e-6)  # other batches


def test_a_pools_token_ids_share_one_int_object_per_id(tiny_model_dir):
    from clues_fl.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    samples = [Sample(f"s{i}", "How do index funds work?", "They track a market index at a low cost.")
               for i in range(3)]
    encoded = encode_samples(tokenizer, samples, 128)
    assert encoded[0].input_ids == encoded[2].input_ids and max(encoded[0].input_ids) > 256
    assert all(a is b for a, b in zip(encoded[0].input_ids, encoded[2].input_ids))
    plain = tokenizer.encode("They track a market index at a low cost.", add_special_tokens=False)
    assert plain == encoded[0].input_ids[encoded[0].prompt_len : -1]  # the same ids
