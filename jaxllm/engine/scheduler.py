"""Continuous batching with chunked prefill, prefix caching, priorities and preemption by recompute.

The scheduler owns every per-step budget: tokens (`max_num_batched_tokens`), seats (`max_num_seqs`:
a running sequence holds one, and an n > 1 request reserves its siblings' seats when admitted, so a
fork never overfills the batch), logits rows (sampled tokens + prompt-logprob positions, capped by the
largest compiled row bucket) and pages (through the PagePool).

Each step: every running sequence gets its remaining tokens (1 for decode, a chunk for a prompt still
being prefilled) within the budgets; leftover budget admits waiting sequences, oldest (or highest
priority) first, each starting from its longest cached prefix. When the pool has no page for a running
sequence, the lowest-priority, latest-arriving running sequence is preempted: its pages are freed
(full ones stay cached) and it goes back to the queue with all its tokens to recompute. A sequence
alone always fits (the engine checks prompt + max_tokens against the pool at add time), so this never
deadlocks and never drops a request.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from jaxllm.config import SchedulerConfig
from jaxllm.engine.kv_pages import PagePool, tail_key
from jaxllm.engine.request import Sequence, SequenceStatus

RESET_SEAT = -1  # seat_inits value: clear the seat's penalty state (a sequence starts from scratch)


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: tokens [start, start + num_tokens) of its token_ids."""

    seq: Sequence
    start: int
    num_tokens: int
    num_samples: int  # tokens sampled from the chunk's last row: 0 mid-prompt, n for an unforked parent
    prompt_logprob_positions: range  # prompt positions p whose row gives the logprob of token p + 1

    @property
    def num_rows(self) -> int:
        return self.num_samples + len(self.prompt_logprob_positions)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # seat -> RESET_SEAT, or the seat a forked sibling copies its prompt state from. Applied on device
    # before this step's tokens are recorded, reading the state as the previous step left it.
    seat_inits: dict[int, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: PagePool, max_logits_rows: int | None = None,
                 max_model_len: int | None = None):
        self.config = config
        self.pool = pool
        self.max_model_len = max_model_len
        self.max_logits_rows = max_logits_rows or config.max_num_batched_tokens + config.max_num_seqs
        if self.max_logits_rows < config.max_num_seqs:
            raise ValueError(f"max_logits_rows ({self.max_logits_rows}) < max_num_seqs ({config.max_num_seqs})")
        self._waiting: list[tuple] = []  # heap of (order key, tiebreak, seq); finished entries are skipped
        self._tiebreak = itertools.count()
        self.num_waiting = 0
        self.running: list[Sequence] = []
        self.free_seats = list(range(config.max_num_seqs - 1, -1, -1))
        self._seat_inits: dict[int, int] = {}
        self.num_preemptions = 0

    # ---- queues -----------------------------------------------------------------------------------

    def _order_key(self, seq: Sequence):
        # FCFS orders by arrival only; the priority policy puts priority first.
        return seq.sort_key if self.config.policy == "priority" else seq.sort_key[1:]

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self._waiting, (self._order_key(seq), next(self._tiebreak), seq))
        self.num_waiting += 1

    def _peek_waiting(self) -> Sequence | None:
        while self._waiting and self._waiting[0][2].status is not SequenceStatus.WAITING:
            heapq.heappop(self._waiting)  # finished (aborted) while waiting
        return self._waiting[0][2] if self._waiting else None

    def _pop_waiting(self) -> Sequence:
        self.num_waiting -= 1
        return heapq.heappop(self._waiting)[2]

    def waiting(self) -> list[Sequence]:
        return [e[2] for e in self._waiting if e[2].status is SequenceStatus.WAITING]

    @property
    def num_unfinished(self) -> int:
        return self.num_waiting + len(self.running)

    def add_running(self, seq: Sequence, parent: Sequence) -> None:
        """A forked sibling: it shares the parent's prompt pages and takes a seat its request reserved."""
        seq.status = SequenceStatus.RUNNING
        seq.seat = seq.request.reserved_seats.pop()
        self._seat_inits[seq.seat] = parent.seat
        self.running.append(seq)

    # ---- seats ------------------------------------------------------------------------------------

    @staticmethod
    def _seats_needed(seq: Sequence) -> int:
        req = seq.request
        return req.num_sequences if (seq.index == 0 and not req.forked) else 1

    def _take_seats(self, seq: Sequence) -> None:
        seq.seat = self.free_seats.pop()
        self._seat_inits[seq.seat] = RESET_SEAT
        for _ in range(self._seats_needed(seq) - 1):
            seq.request.reserved_seats.append(self.free_seats.pop())

    def _release_seats(self, seq: Sequence) -> None:
        if seq.seat is not None:
            self.free_seats.append(seq.seat)
            self._seat_inits.pop(seq.seat, None)
            seq.seat = None
        if seq.index == 0 and not seq.request.forked:
            self.free_seats.extend(seq.request.reserved_seats)
            seq.request.reserved_seats.clear()

    # ---- pages ------------------------------------------------------------------------------------

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Gives `seq` pages for its next `num_tokens` tokens if the pool has them."""
        needed = self.pool.pages_for(seq.num_computed_tokens + num_tokens) - len(seq.pages)
        if needed <= 0:
            return True
        if not self.pool.can_allocate(needed):
            return False
        seq.pages.extend(self.pool.allocate(needed))
        return True

    def _release_pages(self, seq: Sequence) -> None:
        self._keep_tail(seq)
        self.pool.free(seq.pages)
        seq.pages = []
        seq.num_computed_tokens = 0
        seq.num_registered_pages = 0
        seq.num_written_tokens = 0
        seq.epoch += 1  # results of steps still in flight must not name these pages any more

    def _keep_tail(self, seq: Sequence) -> None:
        """Offers the pool the sequence's partly filled page after its last full one (see kv_pages)."""
        ps = self.pool.page_size
        written = min(seq.num_written_tokens, len(seq.token_ids))
        full = written // ps
        if written % ps and full < len(seq.pages) and self.pool.enable_prefix_caching:
            parent = seq.hashes_for(full)[-1] if full else None
            self.pool.register_tail(seq.pages[full], tail_key(parent, seq.request.cache_salt),
                                    seq.token_ids[full * ps:written])

    def _use_cached_prefix(self, seq: Sequence) -> None:
        """Starts a sequence with nothing computed from its longest cached prefix of full pages."""
        req, ps = seq.request, self.pool.page_size
        if not self.pool.enable_prefix_caching:
            return
        # At least the last token is recomputed: its row gives the next token's logits.
        limit = len(seq.token_ids) - 1
        if req.params.needs_penalties or req.pooling == "mean":
            # Penalty state is rebuilt on device from the tokens a step computes, and mean pooling needs
            # every token's hidden state; a cached prefix would skip them. (Such requests still leave
            # their pages in the cache for others.)
            limit = 0
        if req.prompt_logprobs is not None:
            limit = min(limit, len(req.prompt_logprobs) - 1)  # positions whose logprobs are recorded
        pages = self.pool.lookup(seq.hashes_for(limit // ps)) if limit >= ps else []
        cached = len(pages) * ps
        if cached < limit:  # then the part of a page some earlier sequence left with the same tokens
            parent = seq.page_hashes[len(pages) - 1] if pages else None
            tail = self.pool.claim_tail(tail_key(parent, req.cache_salt), seq.token_ids[cached:limit])
            if tail is not None:
                pages = pages + [tail[0]]
                cached += tail[1]
        seq.pages = pages
        seq.num_computed_tokens = seq.num_written_tokens = cached
        seq.num_registered_pages = cached // ps
        first_admission = req.metrics.first_scheduled_time is None and seq.index == 0
        if first_admission:
            req.num_cached_tokens = seq.num_computed_tokens
            self.pool.record_query(len(seq.token_ids), seq.num_computed_tokens)

    def register_computed_pages(self, seq: Sequence, computed: int) -> None:
        """Names the sequence's pages that are full of tokens a finished step computed (`computed`:
        that step's end; only tokens already on the host can be hashed)."""
        seq.num_written_tokens = max(seq.num_written_tokens, computed)
        full = min(computed, len(seq.token_ids)) // self.pool.page_size
        full = min(full, len(seq.pages))
        if full > seq.num_registered_pages:
            hashes = seq.hashes_for(full)
            for i in range(seq.num_registered_pages, full):
                self.pool.register(seq.pages[i], hashes[i])
            seq.num_registered_pages = full

    # ---- the step ---------------------------------------------------------------------------------

    def _plan(self, seq: Sequence, num_tokens: int, rows_left: int) -> ScheduledSeq | None:
        """The largest chunk of at most num_tokens whose logits rows fit in rows_left (None: none)."""
        req, start = seq.request, seq.num_computed_tokens
        n = num_tokens
        while n > 0:
            end = start + n
            positions = range(0)
            if req.prompt_logprobs is not None:
                first = max(start, len(req.prompt_logprobs) - 1)
                positions = range(first, max(first, min(end, req.num_prompt_tokens - 1)))
            # The first token of an unforked n > 1 request is sampled once per sibling.
            fan_out = self._seats_needed(seq) if seq.num_tokens == seq.num_prompt_tokens else 1
            samples = fan_out if (end == seq.num_tokens and seq.request.pooling is None) else 0
            over = len(positions) + samples - rows_left
            if over <= 0:
                return ScheduledSeq(seq, start, n, samples, positions)
            # Stop short of the last token (no sampling this step), or drop prompt-logprob positions.
            n = n - 1 if samples else n - over
        return None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release_pages(seq)
        self._release_seats(seq)
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        self.add(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget, rows_left = self.config.max_num_batched_tokens, self.max_logits_rows
        max_seqs = self.config.max_num_seqs
        self.running.sort(key=self._order_key)  # at most max_num_seqs long

        # Running sequences first, in priority order; preempt from the back when pages run out.
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < max_seqs:
            seq = self.running[i]
            if self._done_when_inflight_lands(seq):
                i += 1
                continue
            plan = self._plan(seq, min(seq.num_uncomputed_tokens, budget), rows_left)
            if plan is None:
                i += 1
                continue
            while not self._grow(seq, plan.num_tokens):
                victim = max((s for s in self.running if id(s) not in scheduled), key=self._order_key)
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(plan)
                scheduled.add(id(seq))
                budget -= plan.num_tokens
                rows_left -= plan.num_rows
                i += 1
            # else seq itself was preempted; the list shifted, keep i

        # Then admit waiting sequences while budget, seats and pages last (not after a preemption:
        # the pool is tight, so let the running ones finish first).
        while budget > 0 and not out.preempted and len(out.scheduled) < max_seqs:
            seq = self._peek_waiting()
            if seq is None or len(self.free_seats) < self._seats_needed(seq):
                break
            if seq.num_computed_tokens == 0 and not seq.pages:
                self._use_cached_prefix(seq)
            plan = self._plan(seq, min(seq.num_uncomputed_tokens, budget), rows_left)
            if plan is None or not self._grow(seq, plan.num_tokens):
                self._release_pages(seq)  # cached pages go back to the LRU untouched
                break
            self._pop_waiting()
            seq.status = SequenceStatus.RUNNING
            self._take_seats(seq)
            self.running.append(seq)
            out.scheduled.append(plan)
            budget -= plan.num_tokens
            rows_left -= plan.num_rows
        out.seat_inits, self._seat_inits = self._seat_inits, {}
        # The device computes the scheduled tokens in step order, so count them now: the next step
        # (async scheduling: before this one's results are back) continues from there.
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            if item.num_samples:
                item.seq.num_inflight += 1
        return out

    def _done_when_inflight_lands(self, seq: Sequence) -> bool:
        """Skip a step for a sequence whose in-flight token is its last (max_tokens / max_model_len), or
        whose grammar must see that token before its next mask can be computed."""
        if not seq.num_inflight:
            return False
        if seq.matcher is not None:
            return True
        n = seq.num_tokens
        return (n - seq.num_prompt_tokens >= seq.request.max_tokens
                or (self.max_model_len is not None and n >= self.max_model_len))

    def preempt_all(self) -> None:
        """Sends every running sequence back to recompute (the device pool was lost)."""
        out = SchedulerOutput()
        for seq in list(self.running):
            self._preempt(seq, out)
        self._seat_inits.clear()

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence from the queues and frees its pages and seats."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.num_waiting -= 1  # its heap entry is skipped when it surfaces
        self._keep_tail(seq)
        self.pool.free(seq.pages)
        seq.pages = []
        seq.epoch += 1
        self._release_seats(seq)
        seq.status = SequenceStatus.FINISHED
