"""What completions and chat share on the app side: the app state, body parsing, the model check, engine
requests and merging the streams of several of them, stream deltas. The pure request / response code
they also share with batch jobs is in server/prepare.py and server/responses.py (re-exported here)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from quart import current_app, request

from jaxllm.engine.async_engine import EngineDeadError, EngineNotReady, EngineOverloaded, RequestStream
from server.errors import APIError
from server.prepare import (EngineLimits, _guess_param, check_logprobs, check_stream_options,  # noqa: F401
                            check_token_ids, decode_json, make_sampling_params, resolve_max_tokens,
                            resolve_model, validate_body)
from server.responses import chat_logprobs, completion_logprobs, lp_value, token_str  # noqa: F401


def state():
    return current_app.extensions["jaxllm"]


def limits() -> EngineLimits:
    """Also the 503 during warm-up: every check below needs the loaded engine."""
    s = state()
    engine = s.require_engine()
    return EngineLimits(tokenizer=engine.tokenizer, max_model_len=int(engine.max_model_len),
                        model_names=s.served_model_names(), make_params=s.engine.make_sampling_params,
                        grammars=getattr(engine, "grammars", None),
                        enable_auto_tool_choice=s.settings.enable_auto_tool_choice,
                        tool_call_parser=s.settings.tool_call_parser)


async def parse_body(model_cls: type[BaseModel]) -> Any:
    raw = await request.get_data(cache=False)  # enforces MAX_CONTENT_LENGTH (413)
    return validate_body(model_cls, decode_json(raw))


def check_model(name: str | None) -> str:
    state().require_engine()  # during warm-up every name is unknown yet: answer 503, not 404
    return resolve_model(name, state().served_model_names())


async def add_request(request_id: str, prompt: str | None, params: Any, token_ids: list[int],
                      priority: int, cache_salt: str | None = None, pooling: bool | None = None) -> RequestStream:
    try:
        return await state().engine.add_request(request_id, prompt, params, prompt_token_ids=token_ids,
                                                priority=priority, cache_salt=cache_salt, pooling=pooling)
    except EngineOverloaded as exc:
        raise APIError(f"server overloaded: {exc}; retry later", 503, headers={"Retry-After": "1"}) from None
    except EngineNotReady as exc:
        raise APIError(str(exc), 503, headers={"Retry-After": "5"}) from None
    except ValueError as exc:
        msg = str(exc)
        param = "prompt" if "prompt" in msg or "token" in msg else _guess_param(msg, "max_tokens")
        raise APIError(msg, 400, param=param) from None


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Yields (stream index, output) from several requests as they progress."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            q.put_nowait((i, exc))
        q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def final_outputs(streams: list[RequestStream]) -> list[Any]:
    """Each request's last output, in order; engine failures become OpenAI errors; the streams are
    closed (aborted if still running) whatever happens."""
    finals: dict[int, Any] = {}
    try:
        async for i, out in merge(streams):
            finals[i] = out
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise engine_error(exc) from None
    finally:
        close_all(streams)
    return [finals[i] for i in range(len(streams))]


def close_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.close()


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), 500, type="server_error")
    return APIError(f"internal error: {exc}", 500, type="server_error")


class ChoiceState:
    """One streamed choice: the token count so far (for usage); finish_reason is reported exactly once."""

    __slots__ = ("num_tokens", "finish_sent")

    def __init__(self):
        self.num_tokens = 0
        self.finish_sent = False

    def delta(self, comp: Any) -> tuple[str, str | None] | None:
        """For a DELTA output of the choice: (new text, finish reason), or None when there is nothing
        to send."""
        if self.finish_sent:
            return None
        finish = comp.finish_reason
        if not comp.text and not comp.token_ids and finish is None:
            return None
        self.num_tokens += len(comp.token_ids)
        if finish is not None:
            self.finish_sent = True
        return comp.text, finish
