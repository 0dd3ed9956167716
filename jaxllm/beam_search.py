"""Beam search on top of the ordinary engine, as vLLM V1 does it: each round runs every live beam for one
token with its top 2 * beam_width logprobs, keeps the beam_width best continuations, and sets finished
ones aside. Beams share their prompt's K/V through prefix caching (each round recomputes at most the
last partly filled page of a beam), so no beam-specific machinery enters the engine.

`BeamSearch` is the state machine; `LLM.beam_search` drives it with `generate`, and the server with its
async engine, so both give the same beams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Beam:
    tokens: list[int]  # prompt + generated
    cum_logprob: float = 0.0
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""


@dataclass
class BeamSearchSequence:
    tokens: list[int]
    text: str
    cum_logprob: float
    finish_reason: str


@dataclass
class BeamSearchOutput:
    """The beam_width best sequences of one prompt, best first (vLLM's shape: `out.sequences`)."""

    sequences: list[BeamSearchSequence]


class BeamSearch:
    def __init__(self, prompt_ids: list[int], params: BeamSearchParams, eos_token_ids: set[int],
                 max_model_len: int, tokenizer):
        self.params, self.eos, self.tokenizer = params, eos_token_ids, tokenizer
        self.prompt_len = len(prompt_ids)
        self.max_len = min(self.prompt_len + params.max_tokens, max_model_len)
        self.live = [Beam(list(prompt_ids))]
        self.done: list[Beam] = []

    def step_params(self) -> SamplingParams:
        """One token per live beam, with enough alternatives to refill every beam."""
        return SamplingParams(temperature=self.params.temperature, max_tokens=1,
                              logprobs=min(2 * self.params.beam_width, 20), ignore_eos=True,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    @property
    def finished(self) -> bool:
        return not self.live

    def _score(self, beam: Beam) -> float:
        n = max(1, len(beam.tokens) - self.prompt_len)
        return beam.cum_logprob / (n ** self.params.length_penalty)

    def advance(self, outputs) -> None:
        """outputs[i]: the engine's finished RequestOutput for live[i] (one token, with logprobs)."""
        width = self.params.beam_width
        candidates: list[Beam] = []
        for beam, out in zip(self.live, outputs, strict=True):
            for tid, lp in out.outputs[0].logprobs[0].items():
                candidates.append(Beam(beam.tokens + [tid], beam.cum_logprob + lp.logprob,
                                       beam.logprobs + [{tid: lp}]))
        candidates.sort(key=lambda b: -b.cum_logprob)
        live = []
        for cand in candidates:
            if len(live) == width:
                break
            if cand.tokens[-1] in self.eos and not self.params.ignore_eos:
                cand.finish_reason = "stop"
                self.done.append(cand)
            elif len(cand.tokens) >= self.max_len:
                cand.finish_reason = "length"
                self.done.append(cand)
            else:
                live.append(cand)
        self.live = live

    def result(self) -> BeamSearchOutput:
        pool = self.done + [Beam(b.tokens, b.cum_logprob, b.logprobs, "length") for b in self.live]
        best = sorted(pool, key=self._score, reverse=True)[: self.params.beam_width]
        skip = not self.params.include_stop_str_in_output
        seqs = []
        for b in best:
            gen = b.tokens[self.prompt_len:]
            if skip and b.finish_reason == "stop":
                gen = gen[:-1]
            seqs.append(BeamSearchSequence(b.tokens, self.tokenizer.decode(gen, skip_special_tokens=True),
                                           b.cum_logprob, b.finish_reason or "length"))
        return BeamSearchOutput(seqs)


def live_beams(searches: list[BeamSearch]) -> list[list[int]]:
    """The token ids of every live beam of every search, in order: one round's requests."""
    return [b.tokens for s in searches for b in s.live]


def advance_all(searches: list[BeamSearch], outputs: list) -> None:
    """Hands each search the outputs of its live beams (`outputs` in `live_beams` order)."""
    for s in searches:
        n = len(s.live)
        if n:
            s.advance(outputs[:n])
            outputs = outputs[n:]
