"""Embeddings: pooled final hidden states equal HF transformers' (AutoModel, float32) within 1e-4, last
and mean pooling, through chunked prefill and batched with generation traffic."""

import json
import os

import numpy as np
import pytest

import models
from jaxllm import LLM, SamplingParams
from tests.test_engine import TINY_LLAMA, assert_pool_empty

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "goldens", "embeddings.json")


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def check(outs, want, pooling):
    for out, w in zip(outs, want, strict=True):
        got = np.asarray(out.outputs.embedding)
        assert got.shape == (len(w[pooling]),) and abs(np.linalg.norm(got) - 1) < 1e-5
        np.testing.assert_allclose(got, w[pooling], atol=1e-4)


def test_tiny_llama_embeddings_match_hf_through_chunked_prefill_and_mixed_batches(golden):
    # A 16-token step budget: the 18-token prompt is pooled over two chunks.
    llm = LLM(TINY_LLAMA, tokenizer=models.default_model_path(), max_num_seqs=4, max_num_batched_tokens=16,
              max_model_len=64, page_size=4, pooling="mean")
    prompts = golden["prompts"]
    check(llm.embed(prompts, use_tqdm=False), golden["tiny-llama"], "mean")  # --pooling mean
    check(llm.embed(prompts, pooling="last", use_tqdm=False), golden["tiny-llama"], "last")
    eng = llm.engine
    for i in range(3):  # generation traffic in the same steps
        eng.add_request(f"gen{i}", None, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        prompt_token_ids=[9 + i] * 10)
    for i, p in enumerate(prompts):
        eng.add_request(f"emb{i}", None, None, prompt_token_ids=p, pooling="last")
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    check([outs[f"emb{i}"] for i in range(3)], golden["tiny-llama"], "last")
    assert all(len(outs[f"gen{i}"].outputs[0].token_ids) == 12 for i in range(3))
    assert eng.get_stats().num_recompiles_after_warmup == 0
    assert_pool_empty(llm)


def test_smollm2_embeddings_match_hf(golden):
    # no warm-up: this test counts no recompiles (see tests/test_engine.py)
    llm = LLM(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, warmup=False)
    check(llm.embed(golden["prompts"], use_tqdm=False), golden["smollm2"], "last")
    check(llm.embed(golden["prompts"], pooling="mean", use_tqdm=False), golden["smollm2"], "mean")
    with pytest.raises(ValueError, match="pooling"):
        llm.engine.add_request("x", "hi", None, pooling="max")
