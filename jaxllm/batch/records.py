"""OpenAI batch lines in and out: input line -> validated engine work (through the server's own request
validation, server/prepare.py) or an error record; final outputs -> output line (through the server's own
response building, server/responses.py). So a body here is byte for byte what the server answers for
the same request, ids and `created` aside.

Every input line has a 64-bit key: a hash of its custom_id, or of (shard, line number) for a line without
a usable custom_id. Output records carry it in their `id` (`batch_req_<key>`), which is how a resumed job
knows, from the committed parts alone, which lines are done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from server.errors import APIError
from server.prepare import EngineLimits, Prepared, decode_json, prepare_chat, prepare_completion, validate_body
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses import chat_response, completion_response

URLS = {"/v1/completions": (CompletionRequest, prepare_completion, "cmpl"),
        "/v1/chat/completions": (ChatCompletionRequest, prepare_chat, "chatcmpl")}


def id_key(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8,
                                          person=b"custom_id").digest(), "little")


def line_key(shard_url: str, lineno: int) -> int:
    # Another hash domain (person) than id_key: no custom_id can collide with a line position.
    return int.from_bytes(hashlib.blake2b(f"{shard_url}\n{lineno}".encode(), digest_size=8,
                                          person=b"line").digest(), "little")


def custom_id_of(raw: bytes) -> str | None:
    """The line's custom_id when the line is a JSON object with a string custom_id."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def key_of(raw: bytes, shard_url: str, lineno: int) -> tuple[int, str | None]:
    cid = custom_id_of(raw)
    return (id_key(cid) if cid is not None else line_key(shard_url, lineno)), cid


@dataclass
class Work:
    """One input line accepted for the engine; its engine requests are `<key>-<i>`, one per prompt."""

    key: int
    custom_id: str
    url: str
    req: Any
    prepared: Prepared
    finals: dict[int, Any] = field(default_factory=dict)

    @property
    def request_ids(self) -> list[str]:
        return [f"{self.key:016x}-{i}" for i in range(len(self.prepared.prompts))]


@dataclass(frozen=True)
class Record:
    """One finished output line and what the summary counts of it."""

    key: int
    line: bytes
    ok: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0


def parse_line(raw: bytes, shard_url: str, lineno: int, limits: EngineLimits) -> Work | Record:
    """Validation errors become the line's error record (the server's status and error body)."""
    key, cid = key_of(raw, shard_url, lineno)
    try:
        obj = decode_json(raw)
        if not isinstance(obj, dict):
            raise APIError("a batch line must be a JSON object", 400)
        if cid is None:
            raise APIError(f"{shard_url} line {lineno}: custom_id (a string, unique in the input) is required",
                           400, param="custom_id")
        method = obj.get("method", "POST")
        if method != "POST":
            raise APIError(f"method {method!r} is not supported (only POST)", 400, param="method")
        url = obj.get("url")
        if url not in URLS:
            raise APIError(f"url {url!r} is not supported (supported: {', '.join(URLS)})", 400, param="url")
        model_cls, prepare, _ = URLS[url]
        req = validate_body(model_cls, obj.get("body"))
        if req.stream:
            raise APIError("stream is not supported in batch jobs", 400, param="stream")
        return Work(key, cid, url, req, prepare(req, limits))
    except APIError as err:
        return error_record(key, cid, err)


def error_record(key: int, custom_id: str | None, err: APIError) -> Record:
    return Record(key, _line(key, custom_id, err.status, f"batch_req_{key:016x}", err.body()), ok=False)


def finished_record(work: Work, tokenizer: Any) -> Record:
    failed = [out.error for out in work.finals.values() if out.error]
    if failed:
        err = APIError(f"internal error: {failed[0]}", 500, type="server_error")
        return error_record(work.key, work.custom_id, err)
    prefix = URLS[work.url][2]
    body_id = f"{prefix}-{work.key:016x}"
    if work.url == "/v1/completions":
        resp = completion_response(work.req, work.prepared, body_id, work.finals, tokenizer)
    else:
        resp = chat_response(work.req, work.prepared, body_id, work.finals[0], tokenizer)
    body = resp.model_dump(mode="json")
    usage = body["usage"]
    return Record(work.key, _line(work.key, work.custom_id, 200, body_id, body), ok=True,
                  prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])


def _line(key: int, custom_id: str | None, status: int, request_id: str, body: dict) -> bytes:
    # `id` first: a resumed job reads the done keys from the first bytes of each line (records.key_of_output).
    rec = {"id": f"batch_req_{key:016x}", "custom_id": custom_id,
           "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}
    return json.dumps(rec, ensure_ascii=False).encode() + b"\n"


_ID_PREFIX = b'{"id": "batch_req_'


def key_of_output(line: bytes) -> int:
    if line.startswith(_ID_PREFIX):
        return int(line[len(_ID_PREFIX):len(_ID_PREFIX) + 16], 16)
    return int(json.loads(line)["id"].removeprefix("batch_req_"), 16)
