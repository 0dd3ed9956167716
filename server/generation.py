"""What completions and chat share: body parsing, model check, sampling params, length checks, logprob
formatting, stream deltas, and merging the streams of several engine requests."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from quart import current_app, request

from jaxllm.engine.async_engine import EngineDeadError, EngineNotReady, EngineOverloaded, RequestStream
from server.errors import APIError, from_validation_error
from server.protocol import MAX_LOGPROBS, ChatTokenLogprob, CompletionLogprobs, SamplingFields, TopLogprob

_LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for "very unlikely"; JSON has no -inf
logger = logging.getLogger(__name__)


def state():
    return current_app.extensions["jaxllm"]


async def parse_body(model_cls: type[BaseModel]) -> Any:
    raw = await request.get_data(cache=False)  # enforces MAX_CONTENT_LENGTH (413)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(f"malformed JSON body: {exc}", 400) from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object", 400)
    ignored = sorted(set(data) - set(model_cls.model_fields))
    if ignored:
        logger.warning("The following fields were present in the request but ignored: %s", ignored)
    # OpenAI's spec makes most fields nullable: null means "the default", not a type error.
    data = {k: v for k, v in data.items() if v is not None or _nullable(model_cls, k)}
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _nullable(model_cls: type[BaseModel], name: str) -> bool:
    field = model_cls.model_fields.get(name)
    return field is None or field.default is None or field.is_required()


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(req: BaseModel) -> tuple[Any, str | None]:
    """(StructuredOutputsParams or None, the request field it came from). OpenAI's response_format,
    vLLM's structured_outputs and its older guided_* fields all land here; more than one is a 400."""
    from jaxllm.sampling_params import StructuredOutputsParams
    found: list[tuple[str, dict]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError("response_format.type must be one of text, json_object, json_schema", 400,
                           param="response_format")
        if rf["type"] == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf["type"] == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError("response_format.json_schema.schema must be a JSON schema object", 400,
                               param="response_format")
            found.append(("response_format", {"json": schema}))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise APIError("structured_outputs must be an object", 400, param="structured_outputs")
        found.append(("structured_outputs", {k: v for k, v in so.items() if v is not None}))
    for name, key in _GUIDED.items():
        value = getattr(req, name, None)
        if value is not None:
            found.append((name, {key: value}))
    if not found:
        return None, None
    if len(found) > 1:
        raise APIError(f"give only one of {', '.join(n for n, _ in found)}", 400, param=found[1][0])
    field, kw = found[0]
    try:
        params = StructuredOutputsParams(**kw)
    except (TypeError, ValueError) as exc:
        raise APIError(f"{field}: {exc}", 400, param=field) from None
    return params, field


async def check_structured_outputs(req: BaseModel) -> Any:
    """Compiles the request's grammar before anything is scheduled: an invalid schema, regex or
    grammar (or an unsupported schema keyword) is a 400 naming the field."""
    params, field = structured_outputs_of(req)
    if params is None:
        return None
    grammars = getattr(state().require_engine(), "grammars", None)
    if grammars is None:
        raise APIError("structured outputs are not available with this engine", 400, param=field)
    try:
        await asyncio.to_thread(grammars.grammar, params)
    except ValueError as exc:
        raise APIError(f"{field}: {exc}", 400, param=field) from None
    return params


def _reject_constant(name: str):
    # Python's json accepts NaN/Infinity, JSON does not; letting them through would poison sampling.
    raise ValueError(f"{name} is not valid JSON")


def check_model(name: str | None) -> str:
    """Returns the name to echo back; an unknown model is a 404, as in OpenAI's API."""
    state().require_engine()  # during warm-up every name is unknown yet: answer 503, not 404
    names = state().served_model_names()
    if name is None or name in names:
        return name or names[0]
    raise APIError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"token id {bad[0]} is out of vocabulary (vocab_size={vocab_size})", 400, param=param)


def resolve_max_tokens(n_prompt: int, max_tokens: int | None, max_model_len: int,
                       param: str = "max_tokens") -> int:
    if n_prompt == 0:
        raise APIError("the prompt is empty", 400, param="prompt" if param == "max_tokens" else "messages")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"{param} must be at least 1, got {max_tokens}", 400, param=param)
    if max_tokens is None:
        if n_prompt >= max_model_len:
            raise APIError(f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                           f"has {n_prompt} tokens.", 400, param="prompt" if param == "max_tokens" else "messages")
        return max_model_len - n_prompt
    if n_prompt + max_tokens > max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                       f"completion). Please reduce the length of the prompt or {param}.", 400, param=param)
    return max_tokens


def check_stream_options(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options is only allowed when stream is true", 400, param="stream_options")


_PARAM_NAMES = ("n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "logit_bias", "skip_special_tokens",
                "include_stop_str_in_output")


def make_sampling_params(req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None, best_of: int | None = None,
                         max_tokens_param: str = "max_tokens", structured_outputs: Any = None) -> Any:
    from jaxllm.sampling_params import RequestOutputKind
    # Streams consume deltas, other requests only the final output: no per-step copies either way.
    kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    kw: dict[str, Any] = {"n": req.n, "max_tokens": max_tokens, "output_kind": kind,
                          "structured_outputs": structured_outputs}
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        kw["stop_token_ids"] = list(req.stop_token_ids)
    if req.logit_bias:
        try:
            kw["logit_bias"] = {int(k): max(-100.0, min(100.0, float(v))) for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError("logit_bias keys must be token ids", 400, param="logit_bias") from None
        check_token_ids(list(kw["logit_bias"]), state().tokenizer().vocab_size, param="logit_bias")
    if best_of is not None:
        kw["best_of"] = best_of
    if req.min_tokens:
        kw["min_tokens"] = req.min_tokens
    if req.ignore_eos:
        kw["ignore_eos"] = True
    if not req.skip_special_tokens:
        kw["skip_special_tokens"] = False
    if req.include_stop_str_in_output:
        kw["include_stop_str_in_output"] = True
    if logprobs is not None:
        kw["logprobs"] = logprobs
    if prompt_logprobs is not None:
        kw["prompt_logprobs"] = prompt_logprobs
    try:
        return state().engine.make_sampling_params(**kw)
    except (ValueError, TypeError) as exc:
        raise APIError(str(exc), 400, param=_guess_param(str(exc), max_tokens_param)) from None


def _guess_param(message: str, max_tokens_param: str) -> str | None:
    """SamplingParams' messages start with the offending parameter's name: take the earliest one named."""
    hits = [(m.start(), name) for name in _PARAM_NAMES
            if (m := re.search(rf"(?<![\w]){name}(?![\w])", message))]
    if not hits:
        return None
    name = min(hits)[1]
    return max_tokens_param if name == "max_tokens" else name


def check_logprobs(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", 400, param=param)


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


def close_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.close()


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), 500, type="server_error")
    return APIError(f"internal error: {exc}", 500, type="server_error")


# ---------------------------------------------------------------- logprobs


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


class ChoiceState:
    """One streamed choice: the token count so far (for logprob offsets and usage); finish_reason is
    reported exactly once."""

    __slots__ = ("num_tokens", "finish_sent")

    def __init__(self):
        self.num_tokens = 0
        self.finish_sent = False

    def delta(self, comp: Any) -> tuple[str, int, str | None] | None:
        """For a DELTA output of the choice: (new text, index of its first token, finish reason), or
        None when there is nothing to send."""
        if self.finish_sent:
            return None
        start = self.num_tokens
        finish = comp.finish_reason
        if not comp.text and not comp.token_ids and finish is None:
            return None
        self.num_tokens += len(comp.token_ids)
        if finish is not None:
            self.finish_sent = True
        return comp.text, start, finish
