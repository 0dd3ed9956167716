"""Final engine outputs -> OpenAI response bodies, and the logprob blocks streams use too: plain functions of
the tokenizer, shared by the server's routes and batch jobs (jaxllm/run_batch.py)."""

from __future__ import annotations

import math
from typing import Any

from server import tools
from server.protocol import (ChatChoice, ChatCompletionResponse, ChatLogprobs, ChatResponseMessage, ChatTokenLogprob,
                             CompletionChoice, CompletionLogprobs, CompletionResponse, PromptTokensDetails, TopLogprob,
                             UsageInfo)

_LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for "very unlikely"; JSON has no -inf



def lp_value(x: float | None) -> float:
    if x is None or math.isnan(x) or x < _LOGPROB_FLOOR:
        return _LOGPROB_FLOOR
    return float(x)


def token_str(tok: Any, tid: int, lp: Any = None) -> str:
    # The tokenizer is passed in: streaming bodies run outside the app context (no current_app there).
    if lp is not None and getattr(lp, "decoded_token", None) is not None:
        return lp.decoded_token
    return tok.decode([tid], skip_special_tokens=False)


def _top(position: dict, k: int) -> list[tuple[int, Any]]:
    items = sorted(position.items(),
                   key=lambda kv: (kv[1].rank if kv[1].rank is not None else 10**9, -kv[1].logprob))
    return items[:k]


def completion_logprobs(tok: Any, token_ids: list[int], positions: list[dict | None] | None, k: int,
                        offset: int) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy logprobs block; positions[i] maps token id -> Logprob (None = no logprob, e.g. the
    first prompt token). Returns it and the text offset after the last token."""
    out = CompletionLogprobs()
    for i, tid in enumerate(token_ids):
        pos = positions[i] if positions is not None and i < len(positions) else None
        chosen = pos.get(tid) if pos else None
        text = token_str(tok, tid, chosen)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if pos is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(lp_value(chosen.logprob) if chosen else None)
        top = {token_str(tok, t, lp): lp_value(lp.logprob) for t, lp in _top(pos, k)}
        if chosen is not None:
            top.setdefault(text, lp_value(chosen.logprob))  # vLLM includes the sampled token
        out.top_logprobs.append(top)
    return out, offset


def chat_logprobs(tok: Any, token_ids: list[int], positions: list[dict] | None, k: int) -> list[ChatTokenLogprob]:
    content = []
    for i, tid in enumerate(token_ids):
        pos = positions[i] if positions is not None and i < len(positions) else {}
        chosen = pos.get(tid) if pos else None
        text = token_str(tok, tid, chosen)
        top = [TopLogprob(token=(s := token_str(tok, t, lp)), logprob=lp_value(lp.logprob),
                          bytes=list(s.encode("utf-8"))) for t, lp in _top(pos or {}, k)]
        content.append(ChatTokenLogprob(token=text, logprob=lp_value(chosen.logprob if chosen else None),
                                        bytes=list(text.encode("utf-8")), top_logprobs=top))
    return content




# ---------------------------------------------------------------- non-streamed bodies


def completion_response(req, prepared, base_id: str, finals: dict[int, Any], tok: Any) -> CompletionResponse:
    """finals[i]: the final RequestOutput of prepared.prompts[i]."""
    prompts = prepared.prompts
    choices = []
    completion_tokens = 0
    for i, (text, ids) in enumerate(prompts):
        out = finals[i]
        for comp in out.outputs:
            completion_tokens += len(comp.token_ids)
            body = comp.text
            logprobs = None
            if req.echo:
                prefix = echo_text(tok, text, ids)
                body = prefix + body
            if req.logprobs is not None:
                offset = 0
                if req.echo:
                    logprobs, offset = completion_logprobs(
                        tok, ids, out.prompt_logprobs or [None] * len(ids), req.logprobs, 0)
                    offset = len(echo_text(tok, text, ids))
                gen, _ = completion_logprobs(tok, comp.token_ids, comp.logprobs, req.logprobs, offset)
                if logprobs is None:
                    logprobs = gen
                else:
                    for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(logprobs, f).extend(getattr(gen, f))
            choices.append(CompletionChoice(index=i * req.n + comp.index, text=body, logprobs=logprobs,
                                            finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                                            prompt_logprobs=prompt_logprobs_json(out) if req.prompt_logprobs else None))
    choices.sort(key=lambda c: c.index)
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    cached = sum(out.num_cached_tokens for out in finals.values())
    return CompletionResponse(id=base_id, model=prepared.model, choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens,
                                              prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)))


def echo_text(tok: Any, text: str | None, ids: list[int]) -> str:
    return text if text is not None else tok.decode(ids, skip_special_tokens=False)


def prompt_logprobs_json(out) -> list | None:
    if out.prompt_logprobs is None:
        return None
    return [None if pos is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                                "decoded_token": lp.decoded_token} for t, lp in pos.items()}
            for pos in out.prompt_logprobs]


def chat_response(req, prepared, request_id: str, final: Any, tok: Any) -> ChatCompletionResponse:
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    n_prompt = len(prepared.prompts[0][1])
    choices = []
    for comp in final.outputs:
        lp = None
        if top_k is not None:
            lp = ChatLogprobs(content=chat_logprobs(tok, comp.token_ids, comp.logprobs, top_k))
        content, calls, finish = comp.text, None, comp.finish_reason
        if prepared.tool_plan is not None:
            content, calls, finish = tools.message_of(prepared.tool_plan, prepared.tool_call_parser, comp.text,
                                                      comp.finish_reason)
        if prepared.echo and content is not None:
            content = prepared.echo + content
        choices.append(ChatChoice(index=comp.index, message=ChatResponseMessage(content=content, tool_calls=calls),
                                  logprobs=lp, finish_reason=finish, stop_reason=comp.stop_reason))
    completion = sum(len(c.token_ids) for c in final.outputs)
    return ChatCompletionResponse(
        id=request_id, model=prepared.model, choices=choices,
        usage=UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=final.num_cached_tokens)))
