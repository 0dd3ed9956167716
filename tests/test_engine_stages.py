"""The engine's typed stages: budgets the scheduler owns, the declared shape table, output kinds that
never alias engine state, device-fault recovery, per-seat penalty state, and automatic prefix caching."""

import asyncio
import random
import time

import numpy as np
import pytest

import models
from jaxllm import LLM, SamplingParams
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.data_parallel import DataParallelEngine
from jaxllm.engine.engine import _sibling_seed
from jaxllm.engine.launch_pacer import LaunchPacer
from jaxllm.sampling_params import RequestOutputKind
from tests.test_engine import TINY_LLAMA, assert_pool_empty


def tiny_llm(**flags):
    return LLM(TINY_LLAMA, tokenizer=models.default_model_path(), **flags)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def tiny(request):
    return tiny_llm(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=96, page_size=4, num_pages=64,
                    async_scheduling=request.param)


def token_ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def assert_same_logprobs(a, b, tol=1e-4):
    """Position by position: the same tokens and ranks; values equal up to batching's float noise
    (the three requests were computed in different batch layouts)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert list(x) == list(y) and [v.rank for v in x.values()] == [v.rank for v in y.values()]
            np.testing.assert_allclose([v.logprob for v in x.values()], [v.logprob for v in y.values()], atol=tol)


def run_engine(eng, max_steps=5000):
    """Steps until idle; returns every output per request id, in order."""
    got: dict[str, list] = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            return got
        for out in eng.step():
            got.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def test_shape_table_is_exactly_what_warmup_compiles(tiny):
    runner = tiny.engine.runner
    assert runner.compiled == set(runner.shapes.programs())
    assert runner.shapes.token_buckets[0] == 1  # single-stream decode runs a 1-row program
    assert runner.shapes.row_buckets[-1] == 2 * 8  # every seat's sample + as many prompt-logprob rows


def test_fan_out_beyond_the_row_bucket_does_not_fail_the_batch(tiny):
    # Defect: 9 short n=8 requests finished their prompts in one step and asked for 72 sampled rows;
    # the runner raised and the engine failed every request in flight.
    params = SamplingParams(n=8, temperature=0.8, seed=1, max_tokens=3, ignore_eos=True)
    outs = tiny.generate([[5 + i, 6, 7] for i in range(9)], params, use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [8] * 9
    assert all(len(c.token_ids) == 3 for o in outs for c in o.outputs)
    assert tiny.engine.get_stats().num_recompiles_after_warmup == 0
    assert_pool_empty(tiny)


def test_prompt_logprobs_with_penalties_bias_and_min_tokens_never_recompile(tiny):
    # Defect: prompt_logprobs rows (R > max_num_seqs) plus a penalty / bias / min_tokens row asked for a
    # sampler shape that warm-up never compiled.
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(20, 60))] for _ in range(6)]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=6, prompt_logprobs=2, logprobs=3,
                             repetition_penalty=1.3 if i % 2 else 1.0, logit_bias={7: 3.0} if i % 3 == 0 else None,
                             min_tokens=4 if i == 4 else 0) for i in range(6)]
    outs = tiny.generate(prompts, params, use_tqdm=False)
    assert all(len(o.prompt_logprobs) == len(p) for o, p in zip(outs, prompts))
    assert all(o.prompt_logprobs[0] is None and all(pos for pos in o.prompt_logprobs[1:]) for o in outs)
    assert tiny.engine.get_stats().num_recompiles_after_warmup == 0
    assert tiny.engine.runner.compiled == set(tiny.engine.runner.shapes.programs())


def test_delta_outputs_add_up_to_the_final_output_and_never_alias(tiny):
    eng = tiny.engine
    prompt = list(range(10, 80))  # 70 tokens: three 32-token steps of prefill
    base = dict(temperature=0.9, seed=5, max_tokens=12, logprobs=2, prompt_logprobs=1, ignore_eos=True, n=2)
    kinds = {"d": RequestOutputKind.DELTA, "f": RequestOutputKind.FINAL_ONLY, "c": RequestOutputKind.CUMULATIVE}
    for rid, kind in kinds.items():
        eng.add_request(rid, None, SamplingParams(output_kind=kind, **base), prompt_token_ids=prompt)
    got = run_engine(eng)
    final = got["f"][-1]
    assert len(got["f"]) == 1 and final.finished
    # Prompt logprobs arrive complete, exactly once, in the first delta.
    with_plp = [o for o in got["d"] if o.prompt_logprobs is not None]
    assert len(with_plp) == 1 and with_plp[0] is got["d"][0]
    assert len(with_plp[0].prompt_logprobs) == len(prompt) == len(final.prompt_logprobs)
    assert_same_logprobs(with_plp[0].prompt_logprobs, final.prompt_logprobs)
    for comp in final.outputs:
        deltas = [c for o in got["d"] for c in o.outputs if c.index == comp.index]
        assert sum((c.token_ids for c in deltas), []) == comp.token_ids and len(comp.token_ids) == 12
        assert "".join(c.text for c in deltas) == comp.text
        assert_same_logprobs(sum((c.logprobs for c in deltas), []), comp.logprobs)
        assert all(len(c.token_ids) <= 1 for c in deltas)  # decode deltas carry only the new token
        assert [c.finish_reason for c in deltas].count("length") == 1
    # Cumulative outputs are snapshots: an early one does not grow as the engine moves on.
    assert got["c"][0].outputs[0].token_ids == [] and got["c"][0].prompt_logprobs is None  # mid-prefill
    early = next(o for o in got["c"] if o.outputs[0].token_ids)
    assert [len(c.token_ids) for c in early.outputs] == [1, 1]
    assert token_ids([got["c"][-1]]) == token_ids([final])


def test_a_failed_step_fails_its_requests_rebuilds_the_pool_and_serving_goes_on(tiny):
    eng = tiny.engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[20 + i] * (5 + i) for i in range(4)]
    expected = token_ids(tiny.generate(prompts, params, use_tqdm=False))

    real = eng.runner._forward
    calls = {"n": 0}

    def faulty(params_, kv_pages, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            kv_pages.delete()  # as after a real device fault: the donated buffer is gone
            raise RuntimeError("injected device fault")
        return real(params_, kv_pages, *args)

    eng.runner._forward = faulty
    try:
        eng.add_request("victim", None, params, prompt_token_ids=[9] * 30)
        failed = [o for _ in range(4) for o in eng.step()]
        assert calls["n"] == 3 and [o.request_id for o in failed if o.finished] == ["victim"]
        for i, p in enumerate(prompts):
            eng.add_request(f"later{i}", None, params, prompt_token_ids=p)
        got = run_engine(eng)
        got["victim"] = [o for o in failed if o.finished]
    finally:
        eng.runner._forward = real
    assert got["victim"][-1].error and "injected device fault" in got["victim"][-1].error
    assert got["victim"][-1].finished and eng.num_step_failures == 1 and eng.healthy
    later = [got[f"later{i}"][-1] for i in range(4)]
    assert all(o.error is None for o in later) and token_ids(later) == expected
    assert_pool_empty(tiny)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_forked_siblings_copy_the_prompt_penalty_state(async_scheduling):
    # Sibling i of a seeded n > 1 request samples with _sibling_seed(seed, i); with the prompt marks
    # copied from its parent's seat it must equal an n = 1 request with that seed.
    llm = tiny_llm(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=4,
                   async_scheduling=async_scheduling, warmup=False)
    prompt = {"prompt_token_ids": [11, 12, 13, 11, 14, 15, 16, 12, 17, 18]}
    p = dict(temperature=1.0, max_tokens=10, repetition_penalty=1.8, presence_penalty=0.6, ignore_eos=True)
    fan = llm.generate(prompt, SamplingParams(n=3, seed=42, **p), use_tqdm=False)[0]
    singles = [llm.generate(prompt, SamplingParams(seed=_sibling_seed(42, i), **p), use_tqdm=False)[0]
               for i in range(3)]
    assert [c.token_ids for c in fan.outputs] == [s.outputs[0].token_ids for s in singles]
    # And the penalties act: without them the same seeds give other tokens.
    plain = llm.generate(prompt, SamplingParams(n=3, seed=42, temperature=1.0, max_tokens=10, ignore_eos=True),
                         use_tqdm=False)[0]
    assert [c.token_ids for c in plain.outputs] != [c.token_ids for c in fan.outputs]


# ---- automatic prefix caching ----------------------------------------------------------------------


def _shared_prefix_workload(seed=0, n=24):
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 512) for _ in range(rng.randint(9, 30))] for _ in range(3)]
    prompts, params = [], []
    for i in range(n):
        prompts.append({"prompt_token_ids": systems[i % 3] + [rng.randrange(3, 512) for _ in range(rng.randint(1, 9))]})
        kind = i % 3
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, 16), ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=rng.randint(1, 16),
                                         ignore_eos=True, n=2 if i % 4 == 1 else 1))
        else:
            params.append(SamplingParams(temperature=1.1, top_k=30, seed=i, frequency_penalty=0.4,
                                         max_tokens=rng.randint(1, 16), ignore_eos=True))
    return prompts, params


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefix_caching_on_and_off_give_identical_outputs_under_eviction_and_preemption(async_scheduling):
    prompts, params = _shared_prefix_workload()
    off = tiny_llm(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_size=4,
                   enable_prefix_caching=False, warmup=False)  # the reference (see tests/test_engine.py)
    alone = [token_ids(off.generate(p, sp, use_tqdm=False))[0] for p, sp in zip(prompts, params)]
    # 20 pages of 4 tokens for 24 concurrent requests: cached pages are evicted and requests preempted.
    on = tiny_llm(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64, page_size=4, num_pages=20,
                  async_scheduling=async_scheduling)
    together = token_ids(on.generate(prompts, params, use_tqdm=False))
    stats = on.engine.get_stats()
    assert together == alone
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0
    assert stats.num_recompiles_after_warmup == 0
    assert_pool_empty(on)
    # Run again on the warm cache, batched: still identical.
    assert token_ids(on.generate(prompts, params, use_tqdm=False)) == alone
    assert_pool_empty(on)


@pytest.fixture(scope="module")
def smol():
    # no warm-up: these tests count no recompiles (see tests/test_engine.py)
    return LLM(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256, warmup=False)


def test_smollm2_prefix_hit_accounting_and_salt(smol):
    eng = smol.engine
    assert eng.pool.page_size == 16
    system = "You are a helpful assistant who answers every question in one short sentence. " * 6
    prefix = eng.tokenizer.encode(system)[:48]
    assert len(prefix) == 48  # exactly 3 pages
    params = SamplingParams(temperature=0, max_tokens=8)
    q1, q2 = eng.tokenizer.encode(" What is 2+2?"), eng.tokenizer.encode(" Name a colour.")
    first = smol.generate({"prompt_token_ids": prefix + q1}, params, use_tqdm=False)[0]
    eng.add_request("second", None, params, prompt_token_ids=prefix + q2)
    eng.add_request("salted", None, params, prompt_token_ids=prefix + q2, cache_salt="tenant-b")
    got = run_engine(eng)
    assert first.num_cached_tokens == 0
    assert got["second"][-1].num_cached_tokens == 48
    assert got["salted"][-1].num_cached_tokens == 0
    assert token_ids([got["second"][-1]]) == token_ids([got["salted"][-1]])
    # Identical to an uncached run of the same prompt.
    eng.reset_prefix_cache()
    fresh = smol.generate({"prompt_token_ids": prefix + q2}, params, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0 and token_ids([fresh]) == token_ids([got["second"][-1]])
    stats = eng.get_stats()
    assert stats.prefix_cache_hits >= 48 and stats.prefix_cache_queries >= 4 * 48
    assert_pool_empty(smol)


def test_smollm2_a_continued_chat_reuses_the_partial_page_its_reply_ended_in(smol):
    eng = smol.engine
    prompt = eng.tokenizer.encode("Here is a short story about an old lighthouse keeper, his dog and a storm "
                                  "that came in from the sea one winter night.")[:20]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = smol.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    history = prompt + list(first.outputs[0].token_ids)  # 32 tokens: the last one was never fed
    written = len(history) - 1
    assert len(prompt) == 20 and written % 16 == 15  # one full page and a tail of 15
    follow = history + eng.tokenizer.encode(" What happened next?")
    second = smol.generate({"prompt_token_ids": follow}, params, use_tqdm=False)[0]
    assert second.num_cached_tokens == written
    # The same as computing every token.
    eng.reset_prefix_cache()
    fresh = smol.generate({"prompt_token_ids": follow}, params, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0 and token_ids([fresh]) == token_ids([second])
    assert_pool_empty(smol)


def test_prompt_logprobs_requests_compute_the_positions_they_need(smol):
    eng = smol.engine
    prefix = list(np.arange(100, 148))
    params = SamplingParams(temperature=0, max_tokens=2)
    smol.generate({"prompt_token_ids": prefix + [5]}, params, use_tqdm=False)
    out = smol.generate({"prompt_token_ids": prefix + [6]}, params.clone(prompt_logprobs=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # positions 1..48 need logits: nothing could be skipped
    assert len(out.prompt_logprobs) == 49 and all(out.prompt_logprobs[1:])
    assert_pool_empty(smol)
    del eng


# ---- async scheduling's launch pacing -----------------------------------------------------------

def test_launch_pacer_holds_the_next_dispatch_until_just_before_the_step_in_flight_ends():
    p = LaunchPacer()
    assert p.delay(8, dispatched_at=0.0, now=0.001) == 0.0  # a bucket never measured: dispatch at once
    # Step 1 (8 tokens) dispatched at t=0 after 2 ms of host work, fetched with a wait, done at 30 ms.
    p.dispatched(0.002)
    p.fetched(8, dispatched_at=0.0, waited_s=0.020, at=0.030)
    # Step 2 went out at 1 ms, queued behind step 1: it began at 30 ms and should end at 60 ms. At 32 ms
    # the next dispatch waits until 60 ms - host work (2 ms) - margin (~2 ms).
    p.dispatched(0.002)
    assert p.delay(8, dispatched_at=0.001, now=0.032) == pytest.approx(0.028 - 0.002 - 0.00199, abs=1e-6)
    # Held back and found step 2 already done when fetched: late, so the margin widens.
    p.fetched(8, dispatched_at=0.001, waited_s=0.0, at=0.070)
    assert p.late == 1
    # Step 3 began when step 2 ended (70 ms) and should end at 100 ms: 29 ms left at 71 ms, less the
    # host work and a margin 2 ms wider than before (1.99 + 2 ms).
    p.dispatched(0.002)
    assert p.delay(8, dispatched_at=0.065, now=0.071) == pytest.approx(0.029 - 0.002 - 0.00399, abs=1e-6)
    # A fetch that did not wait after a dispatch that was not held back is not a late one.
    assert p.delay(8, dispatched_at=0.065, now=0.105) == 0.0  # past the expected end
    p.fetched(8, dispatched_at=0.065, waited_s=0.0, at=0.110)
    assert p.late == 1
    # Steps too short to be worth holding: the wait would be shorter than the margin.
    short = LaunchPacer()
    short.dispatched(0.001)
    short.fetched(1, dispatched_at=0.0, waited_s=0.003, at=0.004)
    assert short.delay(1, dispatched_at=0.0005, now=0.0045) == 0.0


def test_every_step_reports_its_dispatch_and_fetch_to_the_launch_pacer(tiny):
    eng = tiny.engine
    started = time.perf_counter()
    prompts = [{"prompt_token_ids": [5 + i, 6, 7]} for i in range(3)]
    tiny.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    # (the tiny model's steps may end before their fetch, so which buckets got measured is left open)
    assert eng.pacer._host_s is not None and eng.pacer._last_end > started
    assert eng.launch_delay() == 0.0  # idle: nothing in flight


def test_a_step_carrying_a_first_token_is_applied_before_the_next_is_built():
    """Async scheduling overlaps decode steps, never a first token: the step that samples it is applied
    (and its output returned) before another is scheduled, and no pacing holds that back."""
    llm = tiny_llm(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, page_size=4, num_pages=64,
                   async_scheduling=True)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eng.add_request("a", None, params, prompt_token_ids=[5, 6, 7])
    assert eng.step() == []  # a's prefill went out
    assert eng._inflight.first_output
    eng.pacer._device_s[eng._inflight.bucket] = 10.0  # an estimate that would hold the next dispatch
    assert eng.launch_delay() == 0.0
    out = eng.step()
    assert [len(o.outputs[0].token_ids) for o in out] == [1] and eng._inflight is None
    # Decode steps overlap: each call dispatches the next and returns the one before it.
    assert eng.step() == [] and not eng._inflight.first_output
    eng.pacer._device_s[eng._inflight.bucket] = 10.0
    assert eng.launch_delay() > 0
    out = eng.step()
    assert [len(o.outputs[0].token_ids) for o in out] == [2] and eng._inflight is not None
    # b's prefill rides with a's decode row: the call that dispatches it returns a's third token, and
    # that step is then applied alone, a's fourth token with b's first.
    eng.add_request("b", None, params, prompt_token_ids=[8, 9])
    assert [len(o.outputs[0].token_ids) for o in eng.step()] == [3] and eng._inflight.first_output
    out = {o.request_id: len(o.outputs[0].token_ids) for o in eng.step()}
    assert out == {"a": 4, "b": 1} and eng._inflight is None
    while eng.has_unfinished_requests():
        eng.step()
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}]
    alone = tiny_llm(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, page_size=4, num_pages=64,
                     async_scheduling=False)
    expected = token_ids(alone.generate(prompts, params, use_tqdm=False))
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert_pool_empty(llm)


def test_data_parallel_front_waits_for_its_soonest_busy_replica():
    """--data-parallel-size: one step() steps every replica, so the front holds the next dispatch only
    as long as the busy replica whose step in flight ends first allows; idle replicas do not count."""
    class Replica:
        def __init__(self, busy, delay):
            self.busy, self.delay = busy, delay

        def has_unfinished_requests(self):
            return self.busy

        def launch_delay(self):
            return self.delay

    front = DataParallelEngine.__new__(DataParallelEngine)  # the policy alone, without devices
    front.replicas = [Replica(False, 0.0), Replica(True, 0.03), Replica(True, 0.01)]
    assert front.launch_delay() == 0.01
    front.replicas = [Replica(True, 0.03), Replica(False, 0.0)]
    assert front.launch_delay() == 0.03
    front.replicas = [Replica(False, 0.0)]
    assert front.launch_delay() == 0.0


class _HeldStub:
    """An engine whose step in flight always wants the next dispatch held back `hold` seconds."""

    def __init__(self, hold):
        self.hold, self.live, self.steps = hold, set(), []

    def has_unfinished_requests(self):
        return bool(self.live)

    def add_request(self, request_id, prompt, params, **kwargs):
        self.live.add(request_id)

    def abort_request(self, request_id):
        self.live.discard(request_id)

    def launch_delay(self):
        return self.hold

    def step(self):
        self.steps.append(time.perf_counter())
        return []

    def get_stats(self):
        return None


def test_async_engine_waits_out_the_launch_delay_unless_a_request_arrives():
    stub = _HeldStub(hold=0.4)

    async def scenario():
        ae = AsyncEngine(lambda: stub)
        ae.start()
        await ae.ready_future
        try:
            await ae.add_request("a", None, None, prompt_token_ids=[1])
            await asyncio.sleep(1.0)
            gaps = np.diff(stub.steps)
            # nothing arrives: steps go out one hold apart
            assert len(gaps) >= 1 and all(g > 0.35 for g in gaps), gaps
            n = len(stub.steps)
            while len(stub.steps) == n:  # a step just went out: the next hold begins
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            n, sent = len(stub.steps), time.perf_counter()
            await ae.add_request("b", None, None, prompt_token_ids=[2])
            await asyncio.sleep(0.1)
            # the arrival ended the hold: a step went out right after it, not at the hold's end
            assert len(stub.steps) > n and stub.steps[n] - sent < 0.08
        finally:
            ae.shutdown()

    asyncio.run(scenario())
