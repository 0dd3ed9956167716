"""Load client for any OpenAI-compatible server (`/v1/completions`, streaming), with vLLM `bench serve`'s
metric definitions so numbers compare with vLLM's:

  TTFT  send -> first streamed token          TPOT  (E2EL - TTFT) / (output tokens - 1), per request
  ITL   gap between successive stream chunks  E2EL  send -> last byte
  request throughput = completed / duration; output = output tokens / duration; total = (in + out) / duration
  each latency: mean, median, p99 (ms)

  python benchmarks/serve.py --base-url http://127.0.0.1:8000 --dataset sharegpt --num-prompts 200 \
      --request-rate 4 --max-concurrency 32
Arrivals are Poisson at --request-rate (inf = all at once); --max-concurrency caps requests in flight.
Output token counts come from the server's usage (stream_options.include_usage).

  --dataset multiturn --num-prompts 16 --turns 4: 16 ShareGPT chats, each sending its turns one after
  another with the whole history (the server's own replies as generated, special tokens included:
  `skip_special_tokens: false`) resent every turn; arrivals and --max-concurrency count chats.
  Replies are as long as the chat's own (cut to --max-reply-len) unless
  --sharegpt-output-len fixes them; a fixed length with --ignore-eos keeps chats in lockstep, every turn
  arriving together. Later turns' TTFT is reported apart (and per turn): it is what prefix caching cuts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.datasets import (BenchRequest, Conversation, sample_multiturn, sample_random,  # noqa: E402
                                 sample_shared_prefix, sample_sharegpt)


@dataclass
class Result:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    turn: int = 0  # multi-turn chats: 0 for a chat's first request
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    text: str = ""


class RemoteTokenizer:
    """Counts tokens with the server's own /tokenize (vLLM and jaxllm both have it) when no local
    tokenizer is given, so ShareGPT filtering matches the served model."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None):
        import httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url, timeout=60, headers=headers)
        self.model = model

    def encode(self, text: str) -> list[int]:
        body = {"prompt": text, **({"model": self.model} if self.model else {})}
        r = self.client.post("/tokenize", json=body)
        r.raise_for_status()
        return r.json()["tokens"]

    def decode(self, ids: list[int]) -> str:
        r = self.client.post("/detokenize", json={"tokens": ids, **({"model": self.model} if self.model else {})})
        r.raise_for_status()
        return r.json()["prompt"]


async def one_request(session: aiohttp.ClientSession, url: str, model: str | None, req: BenchRequest,
                      ignore_eos: bool, headers: dict, **fields) -> Result:
    body = {"prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos, **fields}
    if model:
        body["model"] = model
    res = Result(prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            buf = b""
            async for raw in resp.content:
                buf += raw
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    line = event.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = chunk["error"].get("message", "stream error")
                        return res
                    if chunk.get("usage"):
                        res.output_tokens = chunk["usage"]["completion_tokens"]
                        res.prompt_len = res.prompt_len or chunk["usage"].get("prompt_tokens", 0)
                        res.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        res.text += chunk["choices"][0]["text"]
                        now = time.perf_counter()
                        if res.ttft == 0.0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
        res.latency = time.perf_counter() - start
        res.ok = res.ttft > 0
        if not res.ok:
            res.error = "no tokens streamed"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def chat(session, url: str, model: str | None, conv: Conversation, ignore_eos: bool,
               headers: dict) -> list[Result]:
    """One conversation, turn after turn, each prompt resending the history with the model's replies."""
    history, results = "", []
    for turn, message in enumerate(conv.user_turns):
        prompt = f"{history}User: {message}\nAssistant:"
        # Forced past EOS (--ignore-eos), a reply goes on with special tokens (`<|im_end|>`,
        # `<|im_start|>`); stripped from its text, the resent history would no longer be the tokens the
        # model produced and a cache keyed by tokens would miss from there on, which no chat that stops
        # at EOS sees. Servers without vLLM's `skip_special_tokens` field ignore it.
        res = await one_request(session, url, model, BenchRequest(prompt, 0, conv.output_lens[turn]), ignore_eos,
                                headers, skip_special_tokens=False)
        res.turn = turn
        results.append(res)
        if not res.ok:
            break
        history = f"{prompt}{res.text}\n"
    return results


async def run(args, requests: list[BenchRequest] | list[Conversation]) -> tuple[list[Result], float]:
    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = np.random.default_rng(args.seed)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    # One connection per request: some servers (llama-server) drop idle keep-alive connections, which
    # would show up as client errors rather than as their speed.
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:

        async def go(req):
            if isinstance(req, Conversation):
                call = chat(session, url, args.model, req, args.ignore_eos, headers)
            else:
                call = one_request(session, url, args.model, req, args.ignore_eos, headers)
            if limit is None:
                return await call
            async with limit:
                return await call

        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(go(req)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        flat = [r for res in results for r in (res if isinstance(res, list) else [res])]
        return flat, time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out: dict = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
                 "total_input_tokens": sum(r.prompt_len for r in ok),
                 "total_output_tokens": sum(r.output_tokens for r in ok),
                 "total_cached_prompt_tokens": sum(r.cached_tokens for r in ok)}
    out["request_throughput"] = len(ok) / duration
    out["output_throughput"] = out["total_output_tokens"] / duration
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / duration
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, xs in series.items():
        ms = np.asarray(xs or [0.0]) * 1000
        out[f"mean_{name}_ms"] = float(ms.mean())
        out[f"median_{name}_ms"] = float(np.median(ms))
        out[f"p99_{name}_ms"] = float(np.percentile(ms, 99))
    later = [r.ttft * 1000 for r in ok if r.turn > 0]
    if later:  # multi-turn: the turns that resend a history a prefix cache can serve
        by_turn = [[r for r in ok if r.turn == t] for t in range(max(r.turn for r in ok) + 1)]
        out["median_ttft_first_turn_ms"] = float(np.median([r.ttft * 1000 for r in by_turn[0]]))
        out["median_ttft_later_turns_ms"] = float(np.median(later))
        # Caching can at best cut a turn's prefill to its uncached tokens: the ratio to watch grows by turn.
        for key, value, stat in (("median_ttft_by_turn_ms", lambda r: r.ttft * 1000, np.median),
                                 ("mean_uncached_prompt_tokens_by_turn", lambda r: r.prompt_len - r.cached_tokens,
                                  np.mean),
                                 ("mean_prompt_tokens_by_turn", lambda r: r.prompt_len, np.mean)):
            out[key] = [round(float(stat([value(r) for r in turn])), 1) for turn in by_turn]
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        out["errors"] = errors[:5]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the server's default)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("JAXLLM_API_KEY"))
    p.add_argument("--dataset", choices=["sharegpt", "random", "prefix", "multiturn"], default="sharegpt",
                   help="prefix: one ~--prefix-len token system prompt shared by every request")
    p.add_argument("--prefix-len", type=int, default=1000)
    p.add_argument("--turns", type=int, default=4, help="multiturn: user turns per chat")
    p.add_argument("--turn-chars", type=int, default=400, help="multiturn: each user message cut to this")
    p.add_argument("--max-reply-len", type=int, default=256,
                   help="multiturn without --sharegpt-output-len: the chats' own reply lengths cut to this")
    p.add_argument("--preset", choices=["decode-heavy"], default=None,
                   help="decode-heavy: ShareGPT prompts <= 128 tokens, 256 output tokens, ignore_eos")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default inf)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly each request's output length")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override ShareGPT reply lengths")
    p.add_argument("--max-model-len", type=int, default=2048, help="skip ShareGPT pairs longer than this")
    p.add_argument("--tokenizer", default=None, help="local tokenizer (HF dir / .gguf); default: server /tokenize")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-vocab-size", type=int, default=10000, help="random prompt ids drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None)
    args = p.parse_args(argv)
    max_prompt_len = min(1024, args.max_model_len // 2)
    if args.preset == "decode-heavy":
        args.dataset, args.sharegpt_output_len, args.ignore_eos, max_prompt_len = "sharegpt", 256, True, 128

    tok = None
    if args.dataset != "random" and not (args.dataset == "multiturn" and args.sharegpt_output_len):
        if args.tokenizer:
            from jaxllm.tokenizer import load_tokenizer
            tok = load_tokenizer(args.tokenizer)
        else:
            tok = RemoteTokenizer(args.base_url, args.model, args.api_key)
    if args.dataset == "multiturn":
        requests = sample_multiturn(args.num_prompts, turns=args.turns, output_len=args.sharegpt_output_len,
                                    seed=args.seed, max_turn_chars=args.turn_chars, tokenizer=tok,
                                    max_reply_len=args.max_reply_len, max_total_len=args.max_model_len)
    elif args.dataset == "random":
        requests = sample_random(args.random_vocab_size, args.num_prompts, args.random_input_len,
                                 args.random_output_len, seed=args.seed, range_ratio=args.random_range_ratio)
    else:
        if args.dataset == "prefix":
            requests = sample_shared_prefix(tok, args.num_prompts, prefix_len=args.prefix_len,
                                            output_len=args.sharegpt_output_len or 64, seed=args.seed)
        else:
            requests = sample_sharegpt(tok, args.num_prompts, output_len=args.sharegpt_output_len, seed=args.seed,
                                       max_prompt_len=max_prompt_len, max_total_len=args.max_model_len)
    random.Random(args.seed).shuffle(requests)
    results, duration = asyncio.run(run(args, requests))
    summary = summarize(results, duration)
    width = max(len(k) for k in summary)
    print("=" * (width + 20))
    for k, v in summary.items():
        print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "api_key"}, **summary,
                       "per_request": [{k: v for k, v in asdict(r).items() if k != "text"} for r in results]},
                      f, indent=1, default=str)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
