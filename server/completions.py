"""POST /v1/completions: one engine request per prompt, n choices each, streamed or not."""

from __future__ import annotations

import asyncio
import time

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from server import sse
from server.errors import APIError
from server.generation import (ChoiceState, add_request, close_all, completion_logprobs, engine_error,
                               final_outputs, limits, merge, parse_body, state)
from server.prepare import prepare_completion
from server.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse,
                             PromptTokensDetails, UsageInfo, random_id)
from server.responses import completion_response, echo_text

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
@document_request(CompletionRequest)
@document_response(CompletionResponse)
@document_response(ErrorResponse, 400)
async def create_completion():
    req: CompletionRequest = await parse_body(CompletionRequest)
    prepared = await asyncio.to_thread(prepare_completion, req, limits())
    base_id = random_id("cmpl")
    if req.use_beam_search:
        return (await _beam_search(req, prepared, base_id)).model_dump(mode="json")
    streams = []
    try:
        for i, ((text, ids), sp) in enumerate(zip(prepared.prompts, prepared.params)):
            streams.append(await add_request(f"{base_id}-{i}", text, sp, ids, req.priority, req.cache_salt))
    except BaseException:
        close_all(streams)
        raise
    if req.stream:
        body = _stream(req, prepared.model, base_id, prepared.prompts, streams, state().tokenizer())
        resp = Response(body, mimetype="text/event-stream", headers=sse.HEADERS)
        resp.timeout = None
        return resp
    finals = dict(enumerate(await final_outputs(streams)))
    return completion_response(req, prepared, base_id, finals, state().tokenizer()).model_dump(mode="json")


async def _beam_search(req: CompletionRequest, prepared, base_id: str) -> CompletionResponse:
    """vLLM's use_beam_search: n beams per prompt, each round one engine request per live beam."""
    from jaxllm.beam_search import BeamSearch, BeamSearchParams, advance_all, live_beams
    if req.stream:
        raise APIError("use_beam_search cannot be streamed", 400, param="use_beam_search")
    engine = state().require_engine()
    searches = []
    for (_, ids), params in zip(prepared.prompts, prepared.params):
        bp_ = BeamSearchParams(beam_width=req.n, max_tokens=params.max_tokens, ignore_eos=req.ignore_eos,
                               temperature=req.temperature or 0.0, length_penalty=req.length_penalty,
                               include_stop_str_in_output=req.include_stop_str_in_output)
        searches.append(BeamSearch(ids, bp_, engine.eos_token_ids, engine.max_model_len, engine.tokenizer))
    round_ = 0
    while beams := live_beams(searches):
        streams = []
        try:
            for k, tokens in enumerate(beams):
                streams.append(await add_request(f"{base_id}-r{round_}-{k}", None, searches[0].step_params(),
                                                 tokens, req.priority, req.cache_salt))
        except BaseException:
            close_all(streams)
            raise
        advance_all(searches, await final_outputs(streams))
        round_ += 1
    choices, completion_tokens = [], 0
    for i, s in enumerate(searches):
        for j, seq in enumerate(s.result().sequences):
            completion_tokens += len(seq.tokens) - s.prompt_len
            choices.append(CompletionChoice(index=i * req.n + j, text=seq.text, finish_reason=seq.finish_reason))
    prompt_tokens = sum(len(ids) for _, ids in prepared.prompts)
    return CompletionResponse(id=base_id, model=prepared.model, choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))


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
                echo = echo_text(tok, text, ids)
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
                text, finish = d
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
