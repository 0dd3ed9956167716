"""POST /v1/chat/completions: the model's chat template renders the messages, then one engine request."""

from __future__ import annotations

import asyncio
import time

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from server import prepare, sse, tools
from server.generation import ChoiceState, add_request, chat_logprobs, engine_error, limits, merge, parse_body, state
from server.prepare import messages_to_dicts  # noqa: F401 - part of this module's API before the split
from server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                             ChatMessage, ChatStreamChoice, DeltaMessage, ErrorResponse, PromptTokensDetails, UsageInfo,
                             random_id)
from server.responses import chat_response

bp = Blueprint("chat", __name__)


async def render_chat(messages: list[ChatMessage], **kwargs) -> tuple[str, list[int]]:
    """The template render and tokenization run off the event loop: long histories take a while."""
    return await asyncio.to_thread(prepare.render_chat, state().tokenizer(), messages, **kwargs)


@bp.post("/v1/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse)
@document_response(ErrorResponse, 400)
async def create_chat_completion():
    req: ChatCompletionRequest = await parse_body(ChatCompletionRequest)
    prepared = await asyncio.to_thread(prepare.prepare_chat, req, limits())
    (text, ids), params = prepared.prompts[0], prepared.params[0]
    request_id = random_id("chatcmpl")
    stream = await add_request(request_id, text, params, ids, req.priority, req.cache_salt)
    if req.stream:
        body = _stream(req, prepared, request_id, len(ids), stream, state().tokenizer())
        resp = Response(body, mimetype="text/event-stream", headers=sse.HEADERS)
        resp.timeout = None
        return resp
    final = None
    try:
        async for _, out in merge([stream]):
            final = out
    except Exception as exc:  # noqa: BLE001
        raise engine_error(exc) from None
    finally:
        stream.close()
    return chat_response(req, prepared, request_id, final, state().tokenizer()).model_dump(mode="json")


async def _stream(req: ChatCompletionRequest, prepared: prepare.Prepared, request_id: str, n_prompt: int, stream,
                  tok):
    model, plan, parser = prepared.model, prepared.tool_plan, prepared.tool_call_parser
    created = int(time.time())
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    opts = req.stream_options
    continuous = bool(opts and opts.continuous_usage_stats)
    states: dict[int, ChoiceState] = {}
    tool_streams: dict[int, tools.ToolStream] = {}
    tokens: dict[int, int] = {}
    cached = 0

    def usage() -> UsageInfo:
        c = sum(tokens.values())
        return UsageInfo(prompt_tokens=n_prompt, completion_tokens=c, total_tokens=n_prompt + c,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def chunk(choices: list[ChatStreamChoice]) -> str:
        return sse.event(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                             usage=usage() if continuous else None))

    try:
        # OpenAI sends the role once per choice, in a first delta with empty content.
        yield chunk([ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=prepared.echo))
                     for j in range(req.n)])
        async for _, out in merge([stream]):
            cached = out.num_cached_tokens
            for comp in out.outputs:
                st = states.setdefault(comp.index, ChoiceState())
                d = st.delta(comp)
                tokens[comp.index] = st.num_tokens
                if d is None:
                    continue
                text, finish = d
                lp = None
                if top_k is not None:
                    lp = ChatLogprobs(content=chat_logprobs(tok, comp.token_ids, comp.logprobs, top_k))
                ts = tool_streams.setdefault(comp.index, tools.ToolStream(plan, parser))
                deltas = ts.feed(text)
                if finish is not None:
                    more, finish = ts.finish(finish)
                    deltas += more
                if not deltas and (lp is not None or finish is not None):
                    deltas = [{"content": ""}]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    yield chunk([ChatStreamChoice(index=comp.index, delta=DeltaMessage(**delta),
                                                  logprobs=lp if k == 0 else None,
                                                  finish_reason=finish if last else None,
                                                  stop_reason=comp.stop_reason if (finish and last) else None)])
        if opts and opts.include_usage:
            yield sse.event(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                                usage=usage()))
    except Exception as exc:  # noqa: BLE001 - after the 200 went out, errors travel in the stream
        yield sse.event(engine_error(exc).body())
    finally:
        stream.close()
    yield sse.DONE
