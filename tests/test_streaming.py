"""Steps whose input grows with a site's pool hold no more than they must: the pool's
token ids are views into one int32 buffer, sentence embeddings are paired chunk by chunk with
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


def test_a_pools_token_ids_are_views_into_one_int32_buffer(tiny_model_dir):
    from clues_fl.data.sources import encode_sample
    from clues_fl.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    samples = [Sample(f"s{i}", f"How do index funds work {'?' * i}", "They track a market index at a low cost.")
               for i in range(3)]
    encoded = encode_samples(tokenizer, samples, 128)
    for s, e in zip(samples, encoded):  # the same ids and prompt as one sample encoded alone
        alone = encode_sample(tokenizer, s, 128)
        assert e.input_ids.tolist() == alone.input_ids and e.prompt_len == alone.prompt_len
        assert e.input_ids.dtype == np.int32 and not e.input_ids.flags.writeable
    base = encoded[0].input_ids.base
    assert all(e.input_ids.base is base for e in encoded)  # one buffer, no copy per sample
    assert sum(e.input_ids.nbytes for e in encoded) == 4 * sum(len(e.input_ids) for e in encoded)
    plain = tokenizer.encode("They track a market index at a low cost.", add_special_tokens=False)
    assert plain == encoded[0].input_ids[encoded[0].prompt_len : -1].tolist()  # the same ids
