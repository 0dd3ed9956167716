"""Server-sent events framing: `data: {json}\n\n` per event, `data: [DONE]` last (OpenAI's stream format)."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def event(payload: Any) -> str:
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json")
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
