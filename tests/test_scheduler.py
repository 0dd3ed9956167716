"""Scheduler and page pool on the host alone: budgets, chunking, preemption, page accounting."""

import random

import pytest

from jaxllm.config import SchedulerConfig
from jaxllm.engine.kv_pages import PagePool
from jaxllm.engine.request import Request, Sequence
from jaxllm.engine.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams


def make_seq(i, prompt_len, max_tokens=8, priority=0):
    req = Request(str(i), None, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens,
                  priority=priority, arrival_time=float(i), order=i)
    seq = Sequence(req, 0, list(range(prompt_len)), seed=0)
    req.sequences.append(seq)
    return seq


def run_to_completion(sched, seqs, max_steps=10_000):
    """Simulates the engine: computed tokens advance, a token is appended when a sequence's last token
    was computed, and a sequence finishes after max_tokens outputs."""
    for _ in range(max_steps):
        batch = sched.schedule()
        if not batch:
            break
        assert batch.total_tokens <= sched.config.max_num_batched_tokens
        assert len(batch.seqs) <= sched.config.max_num_seqs
        for seq, n in zip(batch.seqs, batch.num_tokens):
            assert n >= 1
            assert len(seq.pages) * sched.pool.page_size >= seq.num_computed_tokens + n
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq.token_ids):
                seq.token_ids.append(0)
                if seq.num_output_tokens >= seq.request.max_tokens:
                    sched.finish(seq)
    return all(s.is_finished for s in seqs)


def test_chunked_prefill_respects_token_budget():
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), pool)
    seq = make_seq(0, 40)
    sched.add(seq)
    chunks = []
    while seq.num_computed_tokens < 40:
        batch = sched.schedule()
        chunks.append(batch.num_tokens[0])
        seq.num_computed_tokens += batch.num_tokens[0]
    assert chunks == [16, 16, 8]


def test_decode_first_then_prefill_fills_budget():
    pool = PagePool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10), pool)
    a, b = make_seq(0, 4), make_seq(1, 30)
    sched.add(a)
    batch = sched.schedule()
    a.num_computed_tokens += 4
    a.token_ids.append(1)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_tokens == [1, 9]


def test_preemption_never_loses_requests_and_frees_every_page():
    random.seed(0)
    pool = PagePool(12, 4)  # 48 tokens: far fewer than the requests need together
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), pool)
    seqs = [make_seq(i, random.randint(1, 30), max_tokens=random.randint(1, 12)) for i in range(30)]
    for s in seqs:
        sched.add(s)
    assert run_to_completion(sched, seqs)
    assert sched.num_preemptions > 0
    assert pool.num_free == pool.num_pages and (pool.ref_counts == 0).all()
    assert all(s.num_output_tokens == s.request.max_tokens for s in seqs)


def test_priority_policy_preempts_lowest_priority_first():
    pool = PagePool(4, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, policy="priority"), pool)
    low, high = make_seq(0, 8, priority=5), make_seq(1, 8, priority=0)
    sched.add(low)
    sched.add(high)
    batch = sched.schedule()
    assert batch.seqs[0] is high  # lower value = more important
    for seq, n in zip(batch.seqs, batch.num_tokens):
        seq.num_computed_tokens += n
        seq.token_ids.append(0)
    batch = sched.schedule()  # both need a third page; only one can have it
    assert low in batch.preempted and high in batch.seqs


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
