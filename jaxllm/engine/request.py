"""A request (one prompt, one SamplingParams) and its sequences (the n completions being generated).

A sequence is what the scheduler schedules: `token_ids` is prompt + output so far, of which the first
`num_computed_tokens` have K/V in the pool (counted when a step is scheduled: the device computes them
in order). Prefill, decode and recompute after preemption are all the same thing: compute the remaining
tokens, and sample when the last one is computed. With async scheduling a sampled token may still be
on the device (`num_inflight`) while the next step that consumes it is scheduled.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from jaxllm.engine.kv_pages import page_hash
from jaxllm.outputs import PositionLogprobs, RequestMetrics
from jaxllm.sampling_params import SamplingParams


class TextBuffer:
    """Output text that grows by pieces: appends are O(piece), not O(text) (a str += would copy it all)."""

    __slots__ = ("_pieces", "_len", "_joined")

    def __init__(self):
        self._pieces: list[str] = []
        self._len = 0
        self._joined = ""

    def __len__(self) -> int:
        return self._len

    def append(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self._len += len(piece)

    def tail(self, n: int) -> str:
        """The last n characters (stop strings are searched only there)."""
        out, need = [], n
        for piece in reversed(self._pieces):
            if need <= 0:
                break
            out.append(piece[-need:])
            need -= len(piece)
        return "".join(reversed(out))

    def slice(self, start: int, end: int | None = None) -> str:
        """Characters [start, end), joining only the pieces that cover them."""
        end = self._len if end is None else end
        if start >= end:
            return ""
        out, pos = [], self._len
        for piece in reversed(self._pieces):
            if pos <= start:
                break
            lo = pos - len(piece)
            out.append(piece[max(0, start - lo): max(0, end - lo)])
            pos = lo
        return "".join(reversed(out))

    def truncate(self, n: int) -> None:
        if n < self._len:
            self._pieces = [self.slice(0, n)]
            self._len = n

    def __str__(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: "Request"
    index: int  # which of the request's n completions
    token_ids: list[int]
    seed: int
    num_computed_tokens: int = 0
    num_inflight: int = 0  # sampled on device, not yet appended (briefly 2 while two steps overlap)
    epoch: int = 0  # bumped when the sequence loses its pages (preempted, finished)
    pages: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: TextBuffer = field(default_factory=TextBuffer)  # detokenized output
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    detokenizer: object | None = None
    seat: int | None = None  # row of the device-side penalty state while running (see scheduler)
    matcher: object | None = None  # structured outputs: the grammar state after the appended tokens
    page_hashes: list[bytes] = field(default_factory=list)  # prefix-cache names of full pages so far
    num_registered_pages: int = 0  # leading pages already named in the pool
    num_written_tokens: int = 0  # leading tokens whose K/V its pages hold (finished steps, cache hits)
    # What the last DELTA output reached (tokens, visible characters, logprob positions).
    emitted_tokens: int = 0
    emitted_chars: int = 0

    def hashes_for(self, num_pages: int) -> list[bytes]:
        """The hash chain of the first `num_pages` full pages of token_ids (extended lazily)."""
        ps = self.request.page_size
        salt = self.request.cache_salt
        while len(self.page_hashes) < num_pages:
            i = len(self.page_hashes)
            parent = self.page_hashes[-1] if i else None
            self.page_hashes.append(page_hash(parent, self.token_ids[i * ps:(i + 1) * ps], salt))
        return self.page_hashes[:num_pages]

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens so far, the in-flight one included."""
        return len(self.token_ids) + self.num_inflight

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple:
        """Scheduling order: higher priority (lower value) first, then earlier arrival."""
        return (self.request.priority, self.request.arrival_time, self.request.order, self.index)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    priority: int = 0
    arrival_time: float = field(default_factory=time.time)
    order: int = 0  # arrival counter, breaks ties between equal arrival times
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    forked: bool = False  # n > 1 siblings created after the prompt's prefill
    metrics: RequestMetrics | None = None
    page_size: int = 16
    cache_salt: bytes = b""  # extra key of every page hash: salted requests never share pages
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    reserved_seats: list[int] = field(default_factory=list)  # seats held for n > 1 siblings until the fork
    prompt_logprobs_sent: bool = False
    pooling: str | None = None  # an embedding request ("last" / "mean"): prefill only, no sampling
    pooled: object | None = None  # running sum of pooled hidden rows (NumPy [H])
    embedding: list[float] | None = None

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time, max_tokens_param=self.max_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_sequences(self) -> int:
        """best_of > n generates best_of and returns the n with the highest cumulative logprob."""
        return max(self.params.n, self.params.best_of or 0)

    @property
    def is_finished(self) -> bool:
        return len(self.sequences) == self.num_sequences and all(s.is_finished for s in self.sequences)
