"""POST /v1/completions: one engine request per prompt, n choices each, streamed or not."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from server import sse
from server.errors import APIError
from server.generation import (ChoiceState, add_request, check_logprobs, check_model, check_stream_options,
                               check_token_ids, close_all, completion_logprobs, engine_error, make_sampling_params,
                               check_structured_outputs, merge, parse_body, resolve_max_tokens, state)
from server.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse,
                             PromptTokensDetails, UsageInfo, random_id)

bp = Blueprint("completions", __name__)


def _prompts(req: CompletionRequest, tok) -> list[tuple[str | None, list[int]]]:
    """Normalizes the four prompt forms to (text or None, token ids). Runs off the event loop: long
    prompts take a while to tokenize and must not stall every stream."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif not p:
        raise APIError("the prompt is empty", 400, param="prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise APIError("the prompt is empty", 400, param="prompt")
            out.append((item, tok.encode(item, add_special_tokens=True)))
        else:
            if not item:
                raise APIError("the prompt is empty", 400, param="prompt")
            check_token_ids(item, tok.vocab_size)
            out.append((None, list(item)))
    return out


@bp.post("/v1/completions")
@document_request(CompletionRequest)
@document_response(CompletionResponse)
@document_response(ErrorResponse, 400)
async def create_completion():
    req: CompletionRequest = await parse_body(CompletionRequest)
    model = check_model(req.model)
    check_stream_options(req)
    structured = await check_structured_outputs(req)
    if req.suffix:
        raise APIError("suffix is not supported by this server", 400, param="suffix")
    check_logprobs(req.logprobs, "logprobs")
    check_logprobs(req.prompt_logprobs, "prompt_logprobs")
    if req.best_of is not None:
        if req.best_of < req.n:
            raise APIError(f"best_of ({req.best_of}) must be at least n ({req.n})", 400, param="best_of")
        if req.stream and req.best_of != req.n:
            raise APIError("best_of must equal n when streaming", 400, param="best_of")
    prompts = await asyncio.to_thread(_prompts, req, state().tokenizer())
    max_len = state().max_model_len()
    params = []
    for _, ids in prompts:
        max_tokens = resolve_max_tokens(len(ids), req.max_tokens, max_len)
        prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else req.prompt_logprobs
        params.append(make_sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                           prompt_logprobs=prompt_lp, best_of=req.best_of,
                                           structured_outputs=structured))
    base_id = random_id("cmpl")
    streams = []
    try:
        for i, ((text, ids), sp) in enumerate(zip(prompts, params)):
            streams.append(await add_request(f"{base_id}-{i}", text, sp, ids, req.priority, req.cache_salt))
    except BaseException:
        close_all(streams)
        raise
    if req.stream:
        body = _stream(req, model, base_id, prompts, streams, state().tokenizer())
        resp = Response(body, mimetype="text/event-stream", headers=sse.HEADERS)
        resp.timeout = None
        return resp
    try:
        finals: dict[int, Any] = {}
        async for i, out in merge(streams):
            finals[i] = out
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise engine_error(exc) from None
    finally:
        close_all(streams)
    return _response(req, model, base_id, prompts, finals).model_dump(mode="json")


def _echo_text(tok, text: str | None, ids: list[int]) -> str:
    return text if text is not None else tok.decode(ids, skip_special_tokens=False)


def _response(req, model, base_id, prompts, finals) -> CompletionResponse:
    tok = state().tokenizer()
    choices = []
    completion_tokens = 0
    for i, (text, ids) in enumerate(prompts):
        out = finals[i]
        for comp in out.outputs:
            completion_tokens += len(comp.token_ids)
            body = comp.text
            logprobs = None
            if req.echo:
                prefix = _echo_text(tok, text, ids)
                body = prefix + body
            if req.logprobs is not None:
                offset = 0
                if req.echo:
                    logprobs, offset = completion_logprobs(
                        tok, ids, out.prompt_logprobs or [None] * len(ids), req.logprobs, 0)
                    offset = len(_echo_text(tok, text, ids))
                gen, _ = completion_logprobs(tok, comp.token_ids, comp.logprobs, req.logprobs, offset)
                if logprobs is None:
                    logprobs = gen
                else:
                    for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(logprobs, f).extend(getattr(gen, f))
            choices.append(CompletionChoice(index=i * req.n + comp.index, text=body, logprobs=logprobs,
                                            finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                                            prompt_logprobs=_prompt_lp_json(out) if req.prompt_logprobs else None))
    choices.sort(key=lambda c: c.index)
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    cached = sum(out.num_cached_tokens for out in finals.values())
    return CompletionResponse(id=base_id, model=model, choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens,
                                              prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)))


def _prompt_lp_json(out) -> list | None:
    if out.prompt_logprobs is None:
        return None
    return [None if pos is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                                "decoded_token": lp.decoded_token} for t, lp in pos.items()}
            for pos in out.prompt_logprobs]


async def _stream(req: CompletionRequest, model: str, base_id: str, prompts, streams, tok):
    created = int(time.time())
    n = req.n
    states: dict[int, ChoiceState] = {}
    offsets: dict[int, int] = {}
    completion_tokens: dict[int, int] = {}
    cached_tokens: dict[int, int] = {}
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    opts = req.stream_options
    continuous = bool(opts and opts.continuous_usage_stats)

    def usage() -> UsageInfo:
        c = sum(completion_tokens.values())
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=c, total_tokens=prompt_tokens + c,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached_tokens.values())))

    def chunk(choice: CompletionChoice) -> str:
        return sse.event(CompletionResponse(id=base_id, created=created, model=model, choices=[choice],
                                            usage=usage() if continuous else None))

    echoed: set[int] = set()
    try:
        async for i, out in merge(streams):
            cached_tokens[i] = out.num_cached_tokens
            if req.echo and i not in echoed:
                # The prompt goes out before the first generated text, with its logprobs when asked
                # (they arrive, complete, with the request's first output).
                echoed.add(i)
                text, ids = prompts[i]
                echo = _echo_text(tok, text, ids)
                lp = None
                if req.logprobs is not None:
                    lp, _ = completion_logprobs(tok, ids, out.prompt_logprobs or [None] * len(ids),
                                                req.logprobs, 0)
                for j in range(n):
                    offsets[i * n + j] = len(echo)
                    yield chunk(CompletionChoice(index=i * n + j, text=echo, logprobs=lp))
            for comp in out.outputs:
                idx = i * n + comp.index
                st = states.setdefault(idx, ChoiceState())
                d = st.delta(comp)
                completion_tokens[idx] = st.num_tokens
                if d is None:
                    continue
                text, start, finish = d
                logprobs = None
                if req.logprobs is not None:
                    logprobs, offsets[idx] = completion_logprobs(tok, comp.token_ids, comp.logprobs,
                                                                 req.logprobs, offsets.get(idx, 0))
                yield chunk(CompletionChoice(index=idx, text=text, logprobs=logprobs, finish_reason=finish,
                                             stop_reason=comp.stop_reason if finish else None))
        if opts and opts.include_usage:
            yield sse.event(CompletionResponse(id=base_id, created=created, model=model, choices=[], usage=usage()))
    except Exception as exc:  # noqa: BLE001 - after the 200 went out, errors travel in the stream
        yield sse.event(engine_error(exc).body())
    finally:
        close_all(streams)
    yield sse.DONE
