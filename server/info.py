"""Small endpoints: models, tokenize/detokenize, tokenizer info, health, version, metrics."""

from __future__ import annotations

import asyncio

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from server.app import _version
from server.chat import render_chat
from server.errors import APIError
from server.generation import check_model, check_token_ids, parse_body, state
from server.metrics import CONTENT_TYPE
from server.protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                             TokenizeResponse)

bp = Blueprint("info", __name__)


@bp.get("/v1/models")
@document_response(ModelList)
async def list_models():
    s = state()
    max_len = s.max_model_len()
    root = s.settings.model_root or s.engine.engine.model_name
    cards = [ModelCard(id=name, root=root, max_model_len=max_len) for name in s.served_model_names()]
    return ModelList(data=cards).model_dump(mode="json")


@bp.post("/tokenize")
@document_request(TokenizeRequest)
@document_response(TokenizeResponse)
async def tokenize():
    req: TokenizeRequest = await parse_body(TokenizeRequest)
    check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError("give exactly one of prompt or messages", 400, param="prompt")
    if req.messages is not None:
        if not req.messages:
            raise APIError("messages is empty", 400, param="messages")
        _, ids = await render_chat(req.messages, add_generation_prompt=req.add_generation_prompt,
                             continue_final_message=req.continue_final_message)
    else:
        ids = await asyncio.to_thread(state().tokenizer().encode, req.prompt,
                                      add_special_tokens=req.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=state().max_model_len(), tokens=ids).model_dump()


@bp.post("/detokenize")
@document_request(DetokenizeRequest)
@document_response(DetokenizeResponse)
async def detokenize():
    req: DetokenizeRequest = await parse_body(DetokenizeRequest)
    check_model(req.model)
    tok = state().tokenizer()
    check_token_ids(req.tokens, tok.vocab_size, param="tokens")
    return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False)).model_dump()


@bp.get("/tokenizer_info")
async def tokenizer_info():
    s = state()
    tok = s.tokenizer()
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "bos_token": tok.bos_token,
        "vocab_size": tok.vocab_size,
        "model_max_length": s.max_model_len(),
        "chat_template": tok.chat_template,
    }


@bp.get("/health")
async def health():
    s = state()
    if s.draining:
        raise APIError("the server is shutting down", 503)
    s.require_engine()  # 503 until warm-up has finished
    if not s.engine.healthy:
        raise APIError("the engine is rebuilding its device state after a failed step", 503,
                       headers={"Retry-After": "1"})
    return Response("", status=200)


@bp.post("/reset_prefix_cache")
async def reset_prefix_cache():
    """vLLM's endpoint: forget every cached prefix (e.g. after swapping weights or for benchmarks)."""
    state().require_engine()
    dropped = await state().engine.reset_prefix_cache()
    return {"status": "ok", "pages_dropped": dropped}


@bp.get("/ping")
async def ping():
    return await health()


@bp.get("/version")
async def version():
    return {"version": _version()}


@bp.get("/metrics")
async def metrics():
    return Response(state().metrics.render(), status=200, content_type=CONTENT_TYPE)
