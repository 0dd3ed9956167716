"""Turns a step's sampled tokens into request state and RequestOutputs.

Per token: append it, record its logprobs, check stop conditions (eos / stop_token_ids, stop strings
with hold-back, max_tokens, max_model_len), detokenize incrementally. Per request: an output shaped by
its `output_kind` -- a DELTA of what is new, a CUMULATIVE copy, or only the FINAL one. Outputs never
alias engine state, so a consumer on another thread can hold them while the engine moves on. Host work
per step is proportional to the new tokens (DELTA / FINAL_ONLY), never to a sequence's length.
"""

from __future__ import annotations

import dataclasses
import logging

from jaxllm.engine.request import Request, Sequence
from jaxllm.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from jaxllm.sampling_params import RequestOutputKind

logger = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    # ---- tokens -------------------------------------------------------------------------------------

    def logprob_entry(self, token: int, logprob: float, rank: int, top_ids, top_lps, k: int) -> dict:
        """One position's logprobs: the chosen token first, then the k most likely."""
        piece = self.tokenizer.id_to_piece_text
        entry = {token: Logprob(logprob, rank, piece(token))}
        for r, (t, lp) in enumerate(zip(top_ids[:k], top_lps[:k])):
            entry.setdefault(int(t), Logprob(float(lp), r + 1, piece(int(t))))
        return entry

    def append_token(self, seq: Sequence, token: int, logprob: float, rank: int, top_ids, top_lps) -> bool:
        """Adds a sampled token; True when it finished the sequence (finish_reason set)."""
        req, p = seq.request, seq.request.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if p.logprobs is not None:
            seq.logprobs.append(self.logprob_entry(token, logprob, rank, top_ids, top_lps, p.logprobs))

        n_out = seq.num_output_tokens
        if seq.matcher is not None and not self._advance_grammar(seq, token):
            return True
        stop_ids = p.all_stop_token_ids(self.eos_token_ids) if n_out > p.min_tokens - 1 else set()
        if token in stop_ids:
            seq.finish_reason = "stop"
            seq.stop_reason = None if (token in self.eos_token_ids and token not in (p.stop_token_ids or ())) else token
            if p.include_stop_str_in_output and p.detokenize:
                seq.text.append(seq.detokenizer.add(token))
            return True
        delta = seq.detokenizer.add(token) if p.detokenize else ""
        seq.text.append(delta)
        if p.stop and n_out >= p.min_tokens and self._check_stop_strings(seq, len(delta)):
            return True
        if n_out >= req.max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
            if p.detokenize:
                seq.text.append(seq.detokenizer.finish())  # a character cut off by the limit still shows
            return True
        return False

    def _advance_grammar(self, seq: Sequence, token: int) -> bool:
        """Feeds the token to the sequence's grammar; False when the sequence must end here: the
        grammar is complete (only EOS could follow) or, never expected, rejected the token."""
        m = seq.matcher
        if not m.consume_token(token) or m.is_error():
            logger.error("structured output: grammar rejected token %d (%s); ending the sequence", token,
                         m.get_error())
            seq.finish_reason = "stop"
            return False
        if m.is_stopped() and token not in self.eos_token_ids:
            seq.text.append(seq.detokenizer.add(token) + seq.detokenizer.finish())
            seq.finish_reason = "stop"
            return False
        return True

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_chars: int) -> bool:
        p = seq.request.params
        longest = max(len(s) for s in p.stop)
        window = min(len(seq.text), new_chars + longest - 1)  # only new text can complete one
        tail = seq.text.tail(window)
        hits = [(i, s) for s in p.stop if (i := tail.find(s)) >= 0]
        if not hits:
            return False
        idx, stop = min(hits)
        seq.text.truncate(len(seq.text) - window + idx + (len(stop) if p.include_stop_str_in_output else 0))
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    # ---- outputs ------------------------------------------------------------------------------------

    @staticmethod
    def _visible_chars(seq: Sequence) -> int:
        """While running, hold back a tail that could still become a stop string (never emit it partly)."""
        stops = seq.request.params.stop
        if seq.is_finished or not stops:
            return len(seq.text)
        return max(0, len(seq.text) - (max(len(s) for s in stops) - 1))

    def make_output(self, req: Request, finished: bool, error: str | None = None) -> RequestOutput | None:
        """The request's output after a step, or None when its kind has nothing to say yet."""
        if req.pooling is not None:
            if not finished:
                return None
            return EmbeddingRequestOutput(req.request_id, req.prompt_token_ids, EmbeddingOutput(req.embedding or []),
                                          True, dataclasses.replace(req.metrics), req.num_cached_tokens, error)
        kind = req.params.output_kind
        selecting = req.num_sequences > req.params.n  # best_of: only the final n are reported
        if not finished and (kind is RequestOutputKind.FINAL_ONLY or (selecting and kind is RequestOutputKind.DELTA)):
            return None
        if kind is RequestOutputKind.DELTA and not selecting:
            completions = [c for s in req.sequences if (c := self._delta(s)) is not None]
        else:
            seqs = list(req.sequences)
            if finished and selecting:
                seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: req.params.n]
            completions = [self._cumulative(s, i if selecting else s.index) for i, s in enumerate(seqs)]
        prompt_logprobs = None
        if req.prompt_logprobs is not None and len(req.prompt_logprobs) == req.num_prompt_tokens:
            if kind is not RequestOutputKind.DELTA or not req.prompt_logprobs_sent:
                prompt_logprobs = list(req.prompt_logprobs)  # complete, so never appended to again
        if (kind is RequestOutputKind.DELTA and not completions and prompt_logprobs is None and not finished
                and error is None):
            return None
        req.prompt_logprobs_sent |= prompt_logprobs is not None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, finished,
                             prompt_logprobs=prompt_logprobs, metrics=dataclasses.replace(req.metrics),
                             num_cached_tokens=req.num_cached_tokens, error=error)

    def _cumulative(self, seq: Sequence, index: int) -> CompletionOutput:
        want_lp = seq.request.params.logprobs is not None
        return CompletionOutput(index=index, text=seq.text.slice(0, self._visible_chars(seq)),
                                token_ids=seq.output_token_ids, cumulative_logprob=seq.cumulative_logprob,
                                logprobs=list(seq.logprobs) if want_lp else None,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    def _delta(self, seq: Sequence) -> CompletionOutput | None:
        """What is new in this sequence since its previous delta; None when nothing is (a finished
        sequence reports its finish_reason exactly once)."""
        if seq.emitted_tokens < 0:
            return None  # finish already reported
        visible = self._visible_chars(seq)
        n_out = seq.num_output_tokens
        if visible <= seq.emitted_chars and n_out == seq.emitted_tokens and not seq.is_finished:
            return None
        start = seq.emitted_tokens
        text = seq.text.slice(seq.emitted_chars, visible)
        want_lp = seq.request.params.logprobs is not None
        out = CompletionOutput(index=seq.index, text=text, token_ids=seq.token_ids[seq.num_prompt_tokens + start:],
                               cumulative_logprob=seq.cumulative_logprob,
                               logprobs=seq.logprobs[start:] if want_lp else None,
                               finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        seq.emitted_chars = max(seq.emitted_chars, visible)
        seq.emitted_tokens = -1 if seq.is_finished else n_out
        return out
