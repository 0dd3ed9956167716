"""A request (one prompt, one SamplingParams) and its sequences (the n completions being generated).

A sequence is what the scheduler schedules: `token_ids` is prompt + output so far, of which the first
`num_computed_tokens` have K/V in the pool. Prefill, decode and recompute after preemption are all the
same thing: compute the remaining tokens, and sample when the last one is computed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from jaxllm.outputs import PositionLogprobs, RequestMetrics
from jaxllm.sampling_params import SamplingParams


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
    pages: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""  # detokenized output (may hold back a possible stop-string prefix)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    detokenizer: object | None = None

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
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

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

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)

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
