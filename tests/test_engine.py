"""The engine end to end: HF golden parity through LLM, batch invariance under chunked prefill and
preemption, page accounting, stop conditions, n > 1, logprobs, and no recompiles after warm-up."""

import json
import os
import random

import numpy as np
import pytest

import models
from jaxllm import LLM, SamplingParams

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY_LLAMA = os.path.join(DATA, "tiny-llama")


def golden(name):
    with open(os.path.join(DATA, "goldens", name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def smol():
    """The real default model, small limits so warm-up stays short."""
    return LLM(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)


def tiny_llm(**flags):
    # Tiny random checkpoints have no tokenizer of their own; SmolLM2's covers their 512 ids.
    return LLM(TINY_LLAMA, tokenizer=models.default_model_path(), **flags)


# Engines that only give a test its expected outputs skip warm-up (warmup=False): they build the
# programs they use on first use, not the whole shape table, which on a cold CI machine (no persistent
# compilation cache) costs ~1 s per program. Engines whose test counts recompiles keep it.


def assert_pool_empty(llm):
    pool = llm.engine.pool
    assert pool.num_free == pool.num_pages and (pool.ref_counts == 0).all()
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting() and llm.engine.scheduler.num_waiting == 0
    pool.check()
    assert sorted(llm.engine.scheduler.free_seats) == list(range(llm.engine.config.scheduler.max_num_seqs))


# ---- golden parity on the real model -------------------------------------------------------------

def test_smollm2_greedy_and_logprobs_match_hf(smol):
    g = golden("smollm2-q4_1.json")
    for case in g["cases"]:
        n = len(case["output_ids"])
        assert n >= 32
        out = smol.generate({"prompt_token_ids": case["prompt_ids"]},
                            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=5),
                            use_tqdm=False)[0].outputs[0]
        assert out.token_ids == case["output_ids"]
        assert len(out.logprobs) == len(case["top_logprobs"]) == n
        for step, (ours, theirs) in enumerate(zip(out.logprobs, case["top_logprobs"])):
            ours_top = sorted(((lp.logprob, t) for t, lp in ours.items() if lp.rank <= 5), reverse=True)
            assert len(ours_top) == 5 and len(theirs) >= 5
            for (lp, tid), (tid_hf, lp_hf) in zip(ours_top, theirs[:5]):
                assert tid == tid_hf and abs(lp - lp_hf) < 1e-3, (step, tid, tid_hf, lp, lp_hf)
    assert smol.engine.get_stats().num_recompiles_after_warmup == 0


def test_prompt_logprobs_equal_generation_logprobs(smol):
    """prompt_logprobs of a prompt that contains a greedy continuation = that continuation's logprobs."""
    case = golden("smollm2-q4_1.json")["cases"][0]
    k = 6
    prompt = case["prompt_ids"] + case["output_ids"][:k]
    out = smol.generate({"prompt_token_ids": prompt},
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(k):
        entry = out.prompt_logprobs[len(case["prompt_ids"]) + j]
        tid, lp_hf = case["top_logprobs"][j][0]
        assert tid == case["output_ids"][j] and entry[tid].rank == 1
        assert abs(entry[tid].logprob - lp_hf) < 1e-3


def test_chat_matches_template_golden(smol):
    g = golden("smollm2-q4_1.json")
    out = smol.chat([{"role": "user", "content": "What is 2+2?"}],
                    SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert out.prompt_token_ids == g["cases"][1]["prompt_ids"]
    expected = g["cases"][1]["output_ids"]
    got = out.outputs[0].token_ids
    assert got and got == expected[:len(got)]
    # Either all 32 tokens, or it stopped on the EOS the golden also produced at that point.
    assert len(got) == 32 or (out.outputs[0].finish_reason == "stop" and got[-1] in smol.engine.eos_token_ids)


# ---- stop conditions ------------------------------------------------------------------------------

def test_stop_strings_are_cut_and_never_emitted_partially(smol):
    case = golden("smollm2-q4_1.json")["cases"][0]
    full = smol.generate({"prompt_token_ids": case["prompt_ids"]},
                         SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = "answer is"
    assert stop in text
    cut = smol.generate({"prompt_token_ids": case["prompt_ids"]},
                        SamplingParams(temperature=0, max_tokens=24, stop=[stop, "zzz"]), use_tqdm=False)[0].outputs[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = smol.generate({"prompt_token_ids": case["prompt_ids"]},
                         SamplingParams(temperature=0, max_tokens=24, stop=stop, include_stop_str_in_output=True),
                         use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]

    # Streaming view: no intermediate output may show a prefix of the stop string at its end.
    eng = smol.engine
    eng.add_request("stream", None, SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                    prompt_token_ids=case["prompt_ids"])
    seen = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen.append(o.outputs[0].text)
    assert len(seen) > 5 and all(t.startswith(p) for p, t in zip(seen, seen[1:]))  # text only grows
    assert seen[-1] == cut.text and all(stop[:3] not in t for t in seen)


def test_stop_token_ids_min_tokens_and_max_tokens(smol):
    case = golden("smollm2-q4_1.json")["cases"][0]
    ids = case["output_ids"]
    p = {"prompt_token_ids": case["prompt_ids"]}
    out = smol.generate(p, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ids[2]]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ids[:3] and out.outputs[0].stop_reason == ids[2]
    out = smol.generate(p, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ids[:7] and out.outputs[0].finish_reason == "length"
    # min_tokens suppresses the stop token until 5 tokens exist: the output then diverges from greedy.
    out = smol.generate(p, SamplingParams(temperature=0, max_tokens=8, min_tokens=5, stop_token_ids=[ids[2]]),
                        use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 5 and ids[2] not in out.token_ids[:5] and out.token_ids[:2] == ids[:2]


def test_too_long_and_invalid_requests_fail_at_add(smol):
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        smol.generate("hi " * 10, SamplingParams(max_tokens=300), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        smol.generate({"prompt_token_ids": [1, 10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        smol.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert_pool_empty(smol)


# ---- n > 1, seeds ---------------------------------------------------------------------------------

def test_n_siblings_share_prompt_and_are_reproducible(smol):
    prompt = "Once upon a time, in a land far away, there lived a"
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = smol.generate(prompt, params, use_tqdm=False)[0]
    b = smol.generate([prompt, "Other prompt in the batch"], [params, SamplingParams(temperature=1.0, max_tokens=5)],
                      use_tqdm=False)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3
    # Sibling 0 of an n=3 request is the n=1 request with the same seed.
    single = smol.generate(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0]
    assert single.outputs[0].token_ids == a.outputs[0].token_ids
    best = smol.generate(prompt, SamplingParams(n=2, best_of=4, temperature=1.0, seed=3, max_tokens=6),
                         use_tqdm=False)[0]
    assert len(best.outputs) == 2 and best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob
    assert_pool_empty(smol)


def test_abort_frees_every_page(smol):
    eng = smol.engine
    for i in range(6):
        eng.add_request(f"a{i}", "Tell me a very long story about dragons", SamplingParams(max_tokens=100, n=2, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.pool.num_free < eng.pool.num_pages
    eng.abort_request([f"a{i}" for i in range(6)])
    outs = eng.step()
    assert {o.request_id for o in outs} == {f"a{i}" for i in range(6)}
    assert all(o.finished and c.finish_reason == "abort" for o in outs for c in o.outputs)
    assert not eng.has_unfinished_requests()
    assert_pool_empty(smol)


# ---- batch invariance under chunked prefill and preemption (tiny model) ----------------------------

def _workload(n=36, seed=0):
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append({"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(1, 40))]})
        max_tokens = rng.randint(1, 24)
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=max_tokens, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=1.2, top_k=40, min_p=0.02, seed=i, presence_penalty=0.5,
                                         repetition_penalty=1.2, max_tokens=max_tokens, ignore_eos=True))
    return prompts, params


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_batch_invariance_with_chunked_prefill_and_preemption(async_scheduling):
    prompts, params = _workload()
    alone_llm = tiny_llm(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=80, page_size=4, warmup=False)
    alone = [alone_llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    # 24 pages of 4 tokens: far less than 36 concurrent requests need, and a 16-token step budget.
    busy_llm = tiny_llm(max_num_seqs=16, max_num_batched_tokens=16, max_model_len=64, page_size=4, num_pages=24,
                        async_scheduling=async_scheduling)
    together = [o.outputs[0].token_ids for o in busy_llm.generate(prompts, params, use_tqdm=False)]
    stats = busy_llm.engine.get_stats()
    assert stats.num_preemptions_total > 0
    assert [len(t) for t in together] == [p.max_tokens for p in params]
    assert together == alone
    assert_pool_empty(busy_llm)
    assert stats.num_recompiles_after_warmup == 0


def test_generate_accepts_text_token_ids_and_keeps_order():
    llm = tiny_llm(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, warmup=False)
    outs = llm.generate(["in the", [5, 6, 7], {"prompt_token_ids": [9, 9]}],
                        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs][1:] == [[5, 6, 7], [9, 9]]
    assert outs[0].prompt == "in the" and outs[0].prompt_token_ids == [254, 260] and all(len(o.outputs[0].token_ids) == 3 for o in outs)
    metrics = outs[0].metrics
    assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time <= metrics.finished_time
    np.testing.assert_array_equal(llm.engine.pool.ref_counts, 0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_engine_with_pallas_kernel_in_interpret_mode_matches_reference(backend):
    """The whole engine (mixed prefill/decode steps, chunking) with a Pallas kernel forced on CPU."""
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    flags = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=48, page_size=16, warmup=False)
    ref = [o.outputs[0].token_ids for o in tiny_llm(**flags).generate(prompts, params, use_tqdm=False)]
    kern = tiny_llm(attention_backend=backend, attention_interpret=True, **flags)
    assert [o.outputs[0].token_ids for o in kern.generate(prompts, params, use_tqdm=False)] == ref
