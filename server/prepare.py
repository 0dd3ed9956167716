"""Request -> engine inputs, as plain functions of the tokenizer and the engine's limits: JSON decoding,
validation, prompt tokenization / chat rendering and SamplingParams. The server's routes
(server/completions.py, server/chat.py) and batch jobs (jaxllm/run_batch.py) share them, so a batch line
is accepted or refused exactly as the same request over HTTP. No quart here: batch jobs need only pydantic."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from server.errors import APIError, from_validation_error
from server.protocol import (MAX_LOGPROBS, ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields)

logger = logging.getLogger("server.generation")


@dataclass(frozen=True)
class EngineLimits:
    """What validation needs from a running engine; the server builds it from its state, batch jobs from
    their LLMEngine."""

    tokenizer: Any
    max_model_len: int
    model_names: list[str]  # the first is echoed when a request names none
    make_params: Callable[..., Any]  # SamplingParams(**kw) (tests' fake engines bring their own class)
    grammars: Any = None  # the engine's GrammarCompiler (structured outputs); None: not available
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None


@dataclass
class Prepared:
    """A validated request as engine inputs: one (prompt text or None, token ids, params) per engine request."""

    model: str
    prompts: list[tuple[str | None, list[int]]]
    params: list[Any]
    priority: int = 0
    cache_salt: str | None = None
    tool_plan: Any = None  # chat: server.tools.ToolPlan
    tool_call_parser: str | None = None
    echo: str = ""  # chat: vLLM's echo, the last assistant message the answer continues


def decode_json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(f"malformed JSON body: {exc}", 400) from None


def validate_body(model_cls: type[BaseModel], data: Any) -> Any:
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


def compile_structured_outputs(params: Any, field: str, limits: EngineLimits) -> Any:
    """Compiles the grammar before anything is scheduled: an invalid schema, regex or grammar (or an
    unsupported schema keyword) is a 400 naming the field."""
    if params is None:
        return None
    if limits.grammars is None:
        raise APIError("structured outputs are not available with this engine", 400, param=field)
    try:
        limits.grammars.grammar(params)
    except ValueError as exc:
        raise APIError(f"{field}: {exc}", 400, param=field) from None
    return params


def _reject_constant(name: str):
    # Python's json accepts NaN/Infinity, JSON does not; letting them through would poison sampling.
    raise ValueError(f"{name} is not valid JSON")


def resolve_model(name: str | None, names: list[str]) -> str:
    """Returns the name to echo back; an unknown model is a 404, as in OpenAI's API."""
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


def make_sampling_params(req: SamplingFields, limits: EngineLimits, *, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None, best_of: int | None = None,
                         max_tokens_param: str = "max_tokens", structured_outputs: Any = None) -> Any:
    from jaxllm.sampling_params import RequestOutputKind
    # Streams consume deltas, other requests only the final output: no per-step copies either way.
    kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    kw: dict[str, Any] = {"n": req.n, "max_tokens": max_tokens, "output_kind": kind}
    if structured_outputs is not None:
        kw["structured_outputs"] = structured_outputs
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
        check_token_ids(list(kw["logit_bias"]), limits.tokenizer.vocab_size, param="logit_bias")
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
        return limits.make_params(**kw)
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


# ---------------------------------------------------------------- the two generation endpoints


def prepare_completion(req: CompletionRequest, limits: EngineLimits) -> Prepared:
    """POST /v1/completions: one engine request per prompt. Tokenizes: callers on an event loop run it in
    a thread (long prompts must not stall every stream)."""
    model = resolve_model(req.model, limits.model_names)
    check_stream_options(req)
    structured = compile_structured_outputs(*structured_outputs_of(req), limits)
    if req.suffix:
        raise APIError("suffix is not supported by this server", 400, param="suffix")
    check_logprobs(req.logprobs, "logprobs")
    check_logprobs(req.prompt_logprobs, "prompt_logprobs")
    if req.best_of is not None:
        if req.best_of < req.n:
            raise APIError(f"best_of ({req.best_of}) must be at least n ({req.n})", 400, param="best_of")
        if req.stream and req.best_of != req.n:
            raise APIError("best_of must equal n when streaming", 400, param="best_of")
    prompts = completion_prompts(req, limits.tokenizer)
    params = []
    for _, ids in prompts:
        max_tokens = resolve_max_tokens(len(ids), req.max_tokens, limits.max_model_len)
        prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else req.prompt_logprobs
        params.append(make_sampling_params(req, limits, max_tokens=max_tokens, logprobs=req.logprobs,
                                           prompt_logprobs=prompt_lp, best_of=req.best_of,
                                           structured_outputs=structured))
    return Prepared(model, prompts, params, req.priority, req.cache_salt)


def completion_prompts(req: CompletionRequest, tok) -> list[tuple[str | None, list[int]]]:
    """Normalizes the four prompt forms to (text or None, token ids)."""
    return prompt_forms(req.prompt, tok, "prompt")


def prompt_forms(p: Any, tok, param: str) -> list[tuple[str | None, list[int]]]:
    """A string, a list of strings, token ids or a list of token-id lists -> (text or None, token ids)
    each; empty entries and out-of-vocabulary ids are 400s naming `param`."""
    if isinstance(p, str):
        items: list = [p]
    elif not p:
        raise APIError(f"the {param} is empty", 400, param=param)
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise APIError(f"the {param} is empty", 400, param=param)
            out.append((item, tok.encode(item, add_special_tokens=True)))
        else:
            if not item:
                raise APIError(f"the {param} is empty", 400, param=param)
            check_token_ids(item, tok.vocab_size, param=param)
            out.append((None, list(item)))
    return out


def prepare_chat(req: ChatCompletionRequest, limits: EngineLimits) -> Prepared:
    """POST /v1/chat/completions: the chat template renders the messages into one engine request. Renders
    and tokenizes: callers on an event loop run it in a thread."""
    from server import tools
    model = resolve_model(req.model, limits.model_names)
    check_stream_options(req)
    plan = tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls,
                      auto_enabled=limits.enable_auto_tool_choice, parser=limits.tool_call_parser)
    so, field = structured_outputs_of(req)
    if plan.schema is not None:
        if so is not None:
            raise APIError("a forced tool call cannot be combined with response_format / structured outputs", 400,
                           param="tool_choice")
        from jaxllm.sampling_params import StructuredOutputsParams
        so, field = StructuredOutputsParams(json=plan.schema), "tools"
    structured = compile_structured_outputs(so, field, limits)
    check_logprobs(req.top_logprobs, "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs to be true", 400, param="top_logprobs")
    check_logprobs(req.prompt_logprobs, "prompt_logprobs")
    text, ids = render_chat(limits.tokenizer, req.messages, add_generation_prompt=req.add_generation_prompt,
                            continue_final_message=req.continue_final_message, tools=req.tools,
                            template_kwargs=req.chat_template_kwargs, chat_template=req.chat_template)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(len(ids), requested, limits.max_model_len, param=param)
    params = make_sampling_params(req, limits, max_tokens=max_tokens, logprobs=chat_top_logprobs(req),
                                  prompt_logprobs=req.prompt_logprobs, max_tokens_param=param,
                                  structured_outputs=structured)
    # vLLM's `echo`: the answer starts with the last message when it has the answer's role (assistant).
    last = req.messages[-1]
    echo = last.content if (req.echo and last.role == "assistant" and isinstance(last.content, str)) else ""
    return Prepared(model, [(text, ids)], [params], req.priority, req.cache_salt, plan, limits.tool_call_parser, echo)


def chat_top_logprobs(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


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


def render_chat(tok, messages: list[ChatMessage], *, add_generation_prompt: bool, continue_final_message: bool,
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
