"""Continuous batching with chunked prefill, priorities and preemption by recompute.

Each step: every running sequence gets its remaining tokens (1 for decode, a chunk for a prompt still
being prefilled) within the token budget; leftover budget admits waiting sequences, oldest (or highest
priority) first. When the pool has no page for a running sequence, the lowest-priority, latest-arriving
running sequence is preempted: its pages are freed and it goes back to the front of the queue with all
its tokens to recompute. A sequence alone always fits (the engine checks prompt + max_tokens against
the pool at add time), so this never deadlocks and never drops a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxllm.config import SchedulerConfig
from jaxllm.engine.kv_pages import PagePool
from jaxllm.engine.request import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """Sequences to run this step and how many of their uncomputed tokens each computes."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: PagePool):
        self.config = config
        self.pool = pool
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._sort(self.waiting)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling: it already owns pages and continues where its parent's prompt ended."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _sort(self, queue: list[Sequence]) -> None:
        queue.sort(key=self._order_key)

    def _order_key(self, seq: Sequence):
        # FCFS orders by arrival only; the priority policy puts priority first.
        return seq.sort_key if self.config.policy == "priority" else seq.sort_key[1:]

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Gives `seq` pages for its next `num_tokens` tokens if the pool has them."""
        needed = self.pool.pages_for(seq.num_computed_tokens + num_tokens) - len(seq.pages)
        if needed <= 0:
            return True
        if not self.pool.can_allocate(needed):
            return False
        seq.pages.extend(self.pool.allocate(needed))
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.pool.free(seq.pages)
        seq.pages = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        self.waiting.insert(0, seq)
        self._sort(self.waiting)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        self._sort(self.running)

        # Running sequences first, in priority order; preempt from the back when pages run out.
        i = 0
        # (n > 1 forks can briefly put more than max_num_seqs in running; the rest wait a step.)
        while i < len(self.running) and budget > 0 and len(batch.seqs) < self.config.max_num_seqs:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self._grow(seq, n):
                victim = max((s for s in self.running if s not in batch.seqs), key=self._order_key)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            # seq itself was preempted; the list shifted, keep i

        # Then admit waiting sequences while budget, seats and pages last (not after a preemption:
        # the pool is tight, so let the running ones finish first).
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._grow(seq, n):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence from the queues and frees its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.pages)
        seq.pages = []
        seq.status = SequenceStatus.FINISHED
