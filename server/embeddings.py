"""POST /v1/embeddings: pooled, L2-normalized final hidden states of the served decoder model, each
input a prefill-only engine request batched with generation traffic (`--pooling last|mean`)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from quart import Blueprint
from quart_schema import document_request, document_response

from server.errors import APIError
from server.generation import add_request, check_model, close_all, final_outputs, parse_body, state
from server.prepare import prompt_forms
from server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, ErrorResponse, UsageInfo, random_id

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
@document_request(EmbeddingRequest)
@document_response(EmbeddingResponse)
@document_response(ErrorResponse, 400)
async def create_embeddings():
    req: EmbeddingRequest = await parse_body(EmbeddingRequest)
    model = check_model(req.model)
    engine = state().require_engine()
    hidden = engine.model_config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise APIError(f"dimensions must be {hidden} for this model (it has no Matryoshka-trained sizes)", 400,
                       param="dimensions")
    forms = await asyncio.to_thread(prompt_forms, req.input, state().tokenizer(), "input")
    inputs = [ids for _, ids in forms]
    max_len = state().max_model_len()
    for ids in inputs:
        if len(ids) >= max_len:
            raise APIError(f"This model's maximum context length is {max_len} tokens, but the input has "
                           f"{len(ids)} tokens.", 400, param="input")
    base_id = random_id("embd")
    streams = []
    try:
        for i, ids in enumerate(inputs):
            streams.append(await add_request(f"{base_id}-{i}", None, None, ids, req.priority, pooling=True))
    except BaseException:
        close_all(streams)
        raise
    finals = await final_outputs(streams)
    data = []
    for i in range(len(inputs)):
        vec = finals[i].outputs.embedding
        if req.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
            vec = base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode()
        data.append(EmbeddingData(index=i, embedding=vec))
    n = sum(len(ids) for ids in inputs)
    return EmbeddingResponse(id=base_id, model=model, data=data,
                             usage=UsageInfo(prompt_tokens=n, total_tokens=n)).model_dump(mode="json")
