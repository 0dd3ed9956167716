"""Per-request sampling knobs, named and defaulted like vLLM's `SamplingParams`.

The object is validated and normalized once, in `__post_init__`, so the engine and the device sampler
can trust it: `stop` is always a list of non-empty strings, `stop_token_ids` a list of ints, `top_k` is 0
when off (-1 is accepted and mapped to 0), `logit_bias` has int keys and values clipped to [-100, 100]
(like OpenAI), and greedy requests (temperature < 1e-5) have top_k / top_p / min_p switched off because
they cannot change an argmax.

Invalid values raise `ValueError` whose message starts with the parameter's name, e.g.
`"temperature must be non-negative, got -1"`, so the server can return it verbatim as a 400.

Things the engine resolves (not this file): `max_tokens=None` means "up to max_model_len"; `seed=None`
means the engine draws a random seed for the request once (so all its steps use one key stream);
`best_of=None` means `n`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

_GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy (argmax), like vLLM
MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs
LOGIT_BIAS_LIMIT = 100.0


def _is_int(x: Any) -> bool:
    # bool is an int subclass; `n=True` is a caller bug, not 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything so far, every step (a copy: O(length) per step)
    DELTA = 1  # only what is new since the previous output (streaming servers)
    FINAL_ONLY = 2  # one output, when the request finishes (offline, non-streaming)


@dataclass
class StructuredOutputsParams:
    """Constrain the output (vLLM's names): exactly one of a JSON schema (`json`, a dict or its JSON
    text), any JSON object (`json_object=True`), a regular expression, a choice of strings, or a
    grammar (EBNF / GBNF, or Lark)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {given or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"structured_outputs.{name} must be a string")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k))


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off (normalized to 0)
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to max_model_len (resolved by the engine)
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per generated token (the chosen one is extra)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    # Free-form slot for engine-specific extras; never interpreted here.
    extra_args: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()
        if self.is_greedy:
            # Truncation cannot change an argmax; switching it off lets the sampler skip the sort.
            self.top_k, self.top_p, self.min_p = 0, 1.0, 0.0

    # ---- normalization -------------------------------------------------------------------------

    def _normalize(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                     "top_p", "min_p"):
            v = getattr(self, name)
            if not _is_number(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
            setattr(self, name, float(v))
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            bias: dict[int, float] = {}
            for k, v in dict(self.logit_bias).items():
                try:
                    tok = int(k)  # JSON object keys arrive as strings
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
                if tok < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {tok}")
                if not _is_number(v) or math.isnan(v):
                    raise ValueError(f"logit_bias values must be numbers, got {v!r}")
                bias[tok] = min(max(float(v), -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
            self.logit_bias = bias or None

    # ---- validation ----------------------------------------------------------------------------

    def _validate(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise ValueError(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not self.repetition_penalty > 0.0 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if math.isnan(self.temperature) or math.isinf(self.temperature) or self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature:g}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be -1 (disable) or >= 0, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")

    # ---- helpers -------------------------------------------------------------------------------

    @classmethod
    def greedy(cls, **kwargs: Any) -> SamplingParams:
        """Argmax decoding (temperature 0); other fields as given."""
        return cls(temperature=0.0, **kwargs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        """Whether the sampler needs this request's prompt/output token counts."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def num_samples(self) -> int:
        """Sequences generated per prompt (best_of when set, else n)."""
        return self.best_of if self.best_of is not None else self.n

    def all_stop_token_ids(self, eos_token_id: int | Iterable[int] | None = None) -> set[int]:
        """Token ids that end generation: `stop_token_ids`, plus the model's EOS id(s) unless
        `ignore_eos`. These are also the ids suppressed (bias -inf) while fewer than `min_tokens`
        tokens have been generated."""
        ids = set(self.stop_token_ids or ())
        if not self.ignore_eos and eos_token_id is not None:
            ids.update([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        return ids

    def clone(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied (re-validated)."""
        return replace(self, **changes)
