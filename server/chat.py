"""POST /v1/chat/completions: the model's chat template renders the messages, then one engine request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from server import sse, tools
from server.errors import APIError
from server.generation import (ChoiceState, add_request, chat_logprobs, check_logprobs, check_model,
                               check_stream_options, check_structured_outputs, engine_error, make_sampling_params,
                               merge, parse_body, resolve_max_tokens, state)
from server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                             ChatLogprobs, ChatMessage, ChatResponseMessage, ChatStreamChoice, DeltaMessage,
                             ErrorResponse, PromptTokensDetails, UsageInfo, random_id)

bp = Blueprint("chat", __name__)


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for k, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"messages[{k}]: only text content parts are supported, got "
                                   f"{part.get('type')!r}", 400, param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)  # what vLLM does with several text parts
        d: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        for extra in ("name", "tool_call_id", "tool_calls"):
            if getattr(m, extra) is not None:
                d[extra] = getattr(m, extra)
        out.append(d)
    return out


async def render_chat(messages: list[ChatMessage], **kwargs) -> tuple[str, list[int]]:
    """The template render and tokenization run off the event loop: long histories take a while."""
    return await asyncio.to_thread(_render_chat, state().tokenizer(), messages, **kwargs)


def _render_chat(tok, messages: list[ChatMessage], *, add_generation_prompt: bool, continue_final_message: bool,
                 tools=None, template_kwargs: dict | None = None,
                 chat_template: str | None = None) -> tuple[str, list[int]]:
    if add_generation_prompt and continue_final_message:
        raise APIError("add_generation_prompt and continue_final_message cannot both be true", 400,
                       param="continue_final_message")
    dicts = messages_to_dicts(messages)
    if continue_final_message and dicts[-1]["role"] != "assistant":
        raise APIError("continue_final_message needs a final assistant message", 400, param="messages")
    try:
        text = tok.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, tools=tools,
                                       chat_template=chat_template, **(template_kwargs or {}))
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - template errors (jinja raise_exception) are the client's
        raise APIError(f"chat template failed: {exc}", 400, param="messages") from None
    # The template already wrote BOS etc.; adding special tokens again would duplicate them.
    return text, tok.encode(text, add_special_tokens=False)


@bp.post("/v1/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse)
@document_response(ErrorResponse, 400)
async def create_chat_completion():
    req: ChatCompletionRequest = await parse_body(ChatCompletionRequest)
    model = check_model(req.model)
    check_stream_options(req)
    settings = state().settings
    plan = tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls,
                      auto_enabled=settings.enable_auto_tool_choice, parser=settings.tool_call_parser)
    structured = await check_structured_outputs(req)
    if plan.schema is not None:
        if structured is not None:
            raise APIError("a forced tool call cannot be combined with response_format / structured outputs", 400,
                           param="tool_choice")
        structured = await forced_tool_schema(plan.schema)
    check_logprobs(req.top_logprobs, "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs to be true", 400, param="top_logprobs")
    check_logprobs(req.prompt_logprobs, "prompt_logprobs")
    text, ids = await render_chat(req.messages, add_generation_prompt=req.add_generation_prompt,
                            continue_final_message=req.continue_final_message, tools=req.tools,
                            template_kwargs=req.chat_template_kwargs, chat_template=req.chat_template)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(len(ids), requested, state().max_model_len(), param=param)
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    params = make_sampling_params(req, max_tokens=max_tokens, logprobs=top_k, prompt_logprobs=req.prompt_logprobs,
                                  max_tokens_param=param, structured_outputs=structured)
    request_id = random_id("chatcmpl")
    # vLLM's `echo`: the answer starts with the last message when it has the answer's role (assistant).
    last = req.messages[-1]
    echo = last.content if (req.echo and last.role == "assistant" and isinstance(last.content, str)) else ""
    stream = await add_request(request_id, text, params, ids, req.priority, req.cache_salt)
    if req.stream:
        body = _stream(req, model, request_id, len(ids), stream, state().tokenizer(), plan,
                       settings.tool_call_parser, echo)
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
    choices = []
    tok = state().tokenizer()
    for comp in final.outputs:
        lp = None
        if top_k is not None:
            lp = ChatLogprobs(content=chat_logprobs(tok, comp.token_ids, comp.logprobs, top_k))
        content, calls, finish = tools.message_of(plan, settings.tool_call_parser, comp.text, comp.finish_reason)
        if echo and content is not None:
            content = echo + content
        choices.append(ChatChoice(index=comp.index, message=ChatResponseMessage(content=content, tool_calls=calls),
                                  logprobs=lp, finish_reason=finish, stop_reason=comp.stop_reason))
    completion = sum(len(c.token_ids) for c in final.outputs)
    return ChatCompletionResponse(
        id=request_id, model=model, choices=choices,
        usage=UsageInfo(prompt_tokens=len(ids), completion_tokens=completion, total_tokens=len(ids) + completion,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=final.num_cached_tokens)),
    ).model_dump(mode="json")


async def forced_tool_schema(schema: dict):
    from jaxllm.sampling_params import StructuredOutputsParams
    params = StructuredOutputsParams(json=schema)
    grammars = getattr(state().require_engine(), "grammars", None)
    if grammars is None:
        raise APIError("forced tool calls need structured outputs, not available with this engine", 400,
                       param="tool_choice")
    try:
        await asyncio.to_thread(grammars.grammar, params)
    except ValueError as exc:
        raise APIError(f"tools: a function's parameters schema is not supported: {exc}", 400, param="tools") from None
    return params


async def _stream(req: ChatCompletionRequest, model: str, request_id: str, n_prompt: int, stream, tok,
                  plan: tools.ToolPlan, parser: str | None, echo: str = ""):
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
        yield chunk([ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=echo))
                     for j in range(req.n)])
        async for _, out in merge([stream]):
            cached = out.num_cached_tokens
            for comp in out.outputs:
                st = states.setdefault(comp.index, ChoiceState())
                d = st.delta(comp)
                tokens[comp.index] = st.num_tokens
                if d is None:
                    continue
                text, start, finish = d
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
