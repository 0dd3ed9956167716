"""Beam search: against an exhaustive NumPy search of the same model's log-probabilities, and beams
sharing their prompt's pages through prefix caching."""

import numpy as np

import models
from jaxllm import LLM, BeamSearchParams, SamplingParams
from tests.test_engine import TINY_LLAMA, assert_pool_empty

# The engines here skip warm-up (see tests/test_engine.py): the tests count no recompiles.


def test_beam_search_equals_its_definition_computed_from_the_models_logprobs():
    llm = LLM(TINY_LLAMA, tokenizer=models.default_model_path(), max_num_seqs=16, max_num_batched_tokens=64,
              max_model_len=64, page_size=4, warmup=False)
    prompt = [11, 12, 13, 14, 15, 16, 17]
    width = 2
    beams = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=width, max_tokens=2,
                                                                            ignore_eos=True))[0].sequences

    def top(ids, k):  # the k most likely next tokens with their logprobs
        lps = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, logprobs=k),
                           use_tqdm=False)[0].outputs[0].logprobs[0]
        return sorted(((lp.logprob, t) for t, lp in lps.items()), reverse=True)[:k]

    # The definition: keep the `width` best of each beam's 2*width best continuations, twice.
    first = top(prompt, 2 * width)[:width]
    second = sorted(((lp1 + lp2, (t1, t2)) for lp1, t1 in first for lp2, t2 in top(prompt + [t1], 2 * width)),
                    reverse=True)[:width]
    assert [tuple(b.tokens[len(prompt):]) for b in beams] == [seq for _, seq in second]
    np.testing.assert_allclose([b.cum_logprob for b in beams], [lp for lp, _ in second], atol=1e-4)
    assert llm.engine.get_stats().prefix_cache_hits > 0  # beams reused their prompt's pages
    assert_pool_empty(llm)


def test_beam_search_stops_on_eos_and_decodes_text():
    llm = LLM(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, warmup=False)
    out = llm.beam_search(["The capital of France is"], BeamSearchParams(beam_width=2, max_tokens=8))[0]
    assert len(out.sequences) == 2
    for seq in out.sequences:
        assert seq.finish_reason in ("stop", "length") and isinstance(seq.text, str) and seq.text
        assert np.isfinite(seq.cum_logprob)
