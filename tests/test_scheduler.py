"""Scheduler and page pool on the host alone: budgets (tokens, seats, logits rows, pages), chunking,
preemption, prefix caching and page accounting."""

import random

import pytest

from jaxllm.config import SchedulerConfig
from jaxllm.engine.kv_pages import PagePool
from jaxllm.engine.request import Request, Sequence
from jaxllm.engine.scheduler import RESET_SEAT, Scheduler
from jaxllm.sampling_params import SamplingParams


def make_seq(i, prompt_len, max_tokens=8, priority=0, tokens=None, page_size=4, salt=b"", **params):
    ids = list(tokens) if tokens is not None else list(range(prompt_len))
    req = Request(str(i), None, ids, SamplingParams(max_tokens=max_tokens, **params), max_tokens,
                  priority=priority, arrival_time=float(i), order=i, page_size=page_size, cache_salt=salt)
    if req.params.prompt_logprobs is not None:
        req.prompt_logprobs = [None]
    seq = Sequence(req, 0, list(ids), seed=0)
    req.sequences.append(seq)
    return seq


def advance(sched, out):
    """What the engine does after a step (the scheduler already counted the tokens as computed): full
    pages get named, the sampled token is appended, and a sequence finishes after max_tokens outputs."""
    for item in out.scheduled:
        seq = item.seq
        assert item.start + item.num_tokens <= seq.num_computed_tokens and item.num_tokens >= 1
        assert len(seq.pages) * sched.pool.page_size >= seq.num_computed_tokens
        sched.register_computed_pages(seq, item.start + item.num_tokens)
        if item.num_samples:
            assert seq.num_inflight >= 1
            seq.num_inflight -= 1
            seq.token_ids.append(0)
            if seq.num_output_tokens >= seq.request.max_tokens:
                sched.finish(seq)


def run_to_completion(sched, seqs, max_steps=10_000):
    for _ in range(max_steps):
        out = sched.schedule()
        if not out:
            break
        assert out.total_tokens <= sched.config.max_num_batched_tokens
        assert len(out.scheduled) <= sched.config.max_num_seqs
        seats = [item.seq.seat for item in out.scheduled]
        assert len(set(seats)) == len(seats) and None not in seats
        advance(sched, out)
        sched.pool.check()
    return all(s.is_finished for s in seqs)


def test_chunked_prefill_respects_token_budget():
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), pool)
    seq = make_seq(0, 40)
    sched.add(seq)
    chunks = []
    while seq.num_computed_tokens < 40:
        out = sched.schedule()
        chunks.append(out.scheduled[0].num_tokens)
        assert out.scheduled[0].num_samples == (1 if seq.num_computed_tokens == 40 else 0)
    assert chunks == [16, 16, 8]


def test_decode_first_then_prefill_fills_budget():
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10), pool)
    a, b = make_seq(0, 4), make_seq(1, 30)
    sched.add(a)
    advance(sched, sched.schedule())
    sched.add(b)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == [a, b] and [i.num_tokens for i in out.scheduled] == [1, 9]


def test_preemption_never_loses_requests_and_frees_every_page():
    random.seed(0)
    pool = PagePool(12, 4)  # 48 tokens: far fewer than the requests need together
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), pool)
    seqs = [make_seq(i, random.randint(1, 30), max_tokens=random.randint(1, 12)) for i in range(30)]
    for s in seqs:
        sched.add(s)
    assert run_to_completion(sched, seqs)
    assert sched.num_preemptions > 0
    assert (pool.ref_counts == 0).all() and pool.num_free == pool.num_pages
    assert sorted(sched.free_seats) == list(range(8)) and sched.num_waiting == 0
    assert all(s.num_output_tokens == s.request.max_tokens for s in seqs)


def test_priority_policy_preempts_lowest_priority_first():
    pool = PagePool(4, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, policy="priority"), pool)
    low, high = make_seq(0, 8, priority=5), make_seq(1, 8, priority=0)
    sched.add(low)
    sched.add(high)
    out = sched.schedule()
    assert out.scheduled[0].seq is high  # lower value = more important
    advance(sched, out)
    out = sched.schedule()  # both need a third page; only one can have it
    assert low in out.preempted and high in [i.seq for i in out.scheduled]
    assert low.seat is None and low.pages == []


def test_n_siblings_reserve_their_seats_so_logits_rows_stay_bounded():
    # Before seats were reserved, 9 short n=8 requests finished their prompts in one step and asked
    # for 72 sampled rows, more than the largest compiled row bucket (64): the runner raised.
    pool = PagePool(256, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), pool, max_logits_rows=64)
    seqs = [make_seq(i, 3, n=8) for i in range(9)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert len(out.scheduled) == 1 and out.scheduled[0].num_samples == 8 and out.num_rows == 8
    assert len(sched.free_seats) == 0 and len(seqs[0].request.reserved_seats) == 7
    assert out.seat_inits == {seqs[0].seat: RESET_SEAT}
    sched.finish(seqs[0])  # e.g. aborted before the fork: the reserved seats come back
    assert sorted(sched.free_seats) == list(range(8)) and not seqs[0].request.reserved_seats


def test_prompt_logprob_rows_are_budgeted_by_shortening_the_chunk():
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32), pool, max_logits_rows=8)
    seq = make_seq(0, 20, prompt_logprobs=1)
    sched.add(seq)
    out = sched.schedule()
    item = out.scheduled[0]
    assert item.num_tokens == 8 and item.prompt_logprob_positions == range(0, 8) and out.num_rows == 8
    seq.request.prompt_logprobs += [None] * 8  # the engine records those positions
    out = sched.schedule()
    assert out.scheduled[0].prompt_logprob_positions == range(8, 16)


def test_prefix_cache_hit_counts_exact_pages_and_salt_isolates():
    pool = PagePool(32, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), pool)
    shared = list(range(100, 112))  # 3 full pages
    a = make_seq(0, 0, tokens=shared + [1, 2], max_tokens=1)
    sched.add(a)
    assert run_to_completion(sched, [a])
    assert pool.num_cached_free >= 3 and pool.num_free == pool.num_pages
    b = make_seq(1, 0, tokens=shared + [7], max_tokens=1)
    c = make_seq(2, 0, tokens=shared + [7], max_tokens=1, salt=b"tenant-2")
    d = make_seq(3, 0, tokens=shared, max_tokens=1)  # the last token is always recomputed
    for s in (b, c, d):
        sched.add(s)
    out = sched.schedule()
    starts = {item.seq.request.request_id: item.start for item in out.scheduled}
    assert starts == {"1": 12, "2": 0, "3": 8}
    assert b.request.num_cached_tokens == 12 and c.request.num_cached_tokens == 0
    assert b.pages[:2] == d.pages[:2] and b.page_hashes[:3] == a.page_hashes[:3]  # shared physical pages
    assert pool.ref_counts[b.pages[0]] == 2
    advance(sched, out)
    pool.check()


def test_cached_pages_are_evicted_lru_and_reset_forgets_them():
    pool = PagePool(6, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), pool)
    a = make_seq(0, 0, tokens=list(range(9)), max_tokens=1)
    sched.add(a)
    assert run_to_completion(sched, [a])
    assert pool.num_cached_free == 3  # two full pages named, the partial third kept as a tail
    mid = make_seq(1, 0, tokens=list(range(50, 70)), max_tokens=1)  # needs 5 of the 6 pages
    sched.add(mid)
    assert run_to_completion(sched, [mid])
    again = make_seq(2, 0, tokens=list(range(9)), max_tokens=1)
    sched.add(again)
    out = sched.schedule()
    assert out.scheduled[0].start == 4  # the chain's tail page was evicted first, its head survived
    advance(sched, out)
    big = make_seq(3, 0, tokens=list(range(50, 73)), max_tokens=1)  # needs all 6 pages
    sched.add(big)
    assert run_to_completion(sched, [big])
    assert pool.num_cached_free == 6  # big's own full pages and its tail; a's are gone
    assert pool.reset_prefix_cache() > 0 and pool.num_cached_free == 0
    pool.check()


def test_a_continuation_claims_the_partial_page_its_history_left():
    # A chat's next turn resends the reply, which ended mid-page: that page's tokens are not recomputed.
    pool = PagePool(32, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), pool)
    a = make_seq(0, 0, tokens=list(range(100, 110)), max_tokens=2)
    sched.add(a)
    assert run_to_completion(sched, [a])
    # 12 tokens, of which the last sampled one was never fed: 2 full pages and a tail of 3 written
    assert len(a.token_ids) == 12 and pool.num_cached_free == 3
    b = make_seq(1, 0, tokens=a.token_ids + [5, 6], max_tokens=1)
    c = make_seq(2, 0, tokens=a.token_ids + [5, 6], max_tokens=1, salt=b"tenant-2")
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    starts = {item.seq.request.request_id: item.start for item in out.scheduled}
    assert starts == {"1": 11, "2": 0} and b.request.num_cached_tokens == 11
    assert pool.ref_counts[b.pages[2]] == 1 and pool.num_cached_free == 0  # taken over, no longer cached
    advance(sched, out)
    pool.check()
    assert run_to_completion(sched, [b, c])


def test_of_several_tails_after_one_chain_the_longest_match_is_claimed():
    pool = PagePool(32, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), pool)
    shared = list(range(100, 108))  # 2 full pages
    x = make_seq(0, 0, tokens=shared + [1, 2], max_tokens=1)
    y = make_seq(1, 0, tokens=shared + [1, 3], max_tokens=1)
    for s in (x, y):
        sched.add(s)
    assert run_to_completion(sched, [x, y])
    z = make_seq(2, 0, tokens=shared + [1, 3, 9], max_tokens=3)  # still running when w comes
    w = make_seq(3, 0, tokens=shared + [1, 3, 9], max_tokens=1)
    sched.add(z)
    out = sched.schedule()
    assert out.scheduled[0].start == 10  # y's tail: [1, 3]
    advance(sched, out)
    sched.add(w)
    out = sched.schedule()
    assert [i.start for i in out.scheduled if i.seq is w] == [9]  # y's tail is z's; x's [1, 2] gives one token
    advance(sched, out)
    pool.check()
    assert run_to_completion(sched, [z, w])
    assert pool.num_free == pool.num_pages
    pool.check()


def test_async_scheduling_counts_the_inflight_token():
    # The next step is scheduled before the previous one's sampled token is on the host.
    pool = PagePool(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16), pool, max_model_len=64)
    seq = make_seq(0, 6, max_tokens=2)
    sched.add(seq)
    first = sched.schedule()
    assert first.scheduled[0].num_samples == 1 and seq.num_inflight == 1 and seq.num_tokens == 7
    second = sched.schedule()  # decode of the in-flight token, which it will read on the device
    item = second.scheduled[0]
    assert (item.start, item.num_tokens, item.num_samples) == (6, 1, 1)
    advance(sched, first)  # the first token lands; the second is in flight and is the last one
    assert not sched.schedule()  # max_tokens is reached when it lands: no step for it
    advance(sched, second)
    assert seq.is_finished


def test_pool_refcounts():
    pool = PagePool(4, 16)
    pages = pool.allocate(2)
    shared = pool.share(pages[:1])
    pool.free(pages)
    assert pool.num_free == 3
    pool.free(shared)
    assert pool.num_free == 4
    with pytest.raises(AssertionError):
        pool.free(shared)
    with pytest.raises(RuntimeError):
        pool.allocate(5)
