"""The OpenAI-compatible server end to end: a real `python -m jaxllm.serve` subprocess on the default
model (SmolLM2-135M), driven with the official `openai` client and raw HTTP. One server for the module."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_support import ServerProcess, metric_value, sse_payloads

MAX_LEN = 512
pytestmark = pytest.mark.timeout(600)


class _External:
    """JAXLLM_TEST_SERVER=http://host:port reuses a server started by hand with the flags below (faster
    iteration while developing); the SIGTERM test is skipped then."""

    def __init__(self, url: str):
        self.base_url, self.proc, self.health_503_before_ready = url.rstrip("/"), None, True


@pytest.fixture(scope="module")
def server():
    if os.environ.get("JAXLLM_TEST_SERVER"):
        yield _External(os.environ["JAXLLM_TEST_SERVER"])
        return
    # JAXLLM_TEST_SERVER_DP=2 runs this whole suite against --data-parallel-size 2 (simulated CPU devices).
    dp = os.environ.get("JAXLLM_TEST_SERVER_DP")
    extra, env = ((["--data-parallel-size", dp], {"XLA_FLAGS": f"--xla_force_host_platform_device_count={dp}"})
                  if dp else ([], None))
    srv = ServerProcess(["--max-num-seqs", "16", "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", "128",
                         "--max-request-bytes", "64KiB", "--served-model-name", "smol", "--drain-timeout", "60",
                         *extra], env=env)
    srv.wait_ready(600)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def tokenize(http, text: str) -> list[int]:
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200
    return r.json()["tokens"]


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: str = ""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert contains in err["message"]
    return err


# ---------------------------------------------------------------- info endpoints


def test_health_version_models(server, client, http):
    assert server.health_503_before_ready
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"]
    m = http.get("/v1/models").json()["data"][0]
    assert m["object"] == "model" and m["owned_by"] and isinstance(m["created"], int)
    assert m["max_model_len"] == MAX_LEN and m["root"]


def test_start_up_heap_is_frozen_out_of_garbage_collection(server):
    if server.proc is None:
        pytest.skip("an external server's log is not ours to read")
    deadline = time.monotonic() + 30  # frozen on the event loop right after /health turns 200
    while not (m := re.search(r"(\d+) start-up objects frozen out of garbage collection", server.log_text())):
        assert time.monotonic() < deadline, server.log_text()[-2000:]
        time.sleep(0.2)
    assert int(m.group(1)) > 100_000  # the modules, compiled programs and engine, not a handful


def test_tokenize_detokenize_tokenizer_info(http):
    r = http.post("/tokenize", json={"prompt": "Hello world, hello JAX."}).json()
    assert r["count"] == len(r["tokens"]) > 3 and r["max_model_len"] == MAX_LEN
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith("Hello world, hello JAX.")
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] and "{%" in info["chat_template"] and info["vocab_size"] > 1000
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "Hi" in text and text.startswith("<|im_start|>")  # SmolLM2's ChatML template


def test_openapi_describes_routes(http):
    spec = http.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]


# Required keys, transcribed from OpenAI's published OpenAPI spec (components.schemas).
SPEC_REQUIRED = {
    "completion": {"id", "object", "created", "model", "choices"},
    "completion.choice": {"finish_reason", "index", "logprobs", "text"},
    "chat": {"choices", "created", "id", "model", "object"},
    "chat.choice": {"finish_reason", "index", "message", "logprobs"},
    "chat.message": {"role", "content", "refusal"},
    "chunk.choice": {"delta", "finish_reason", "index"},
    "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
    "model": {"id", "object", "created", "owned_by"},
}


def test_response_shapes_follow_openai_spec(server, http):
    def has(obj, kind):
        assert SPEC_REQUIRED[kind] <= set(obj), (kind, obj)

    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()
    has(r, "completion"), has(r["usage"], "usage"), has(r["choices"][0], "completion.choice")
    assert r["object"] == "text_completion"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 2}).json()
    has(r, "chat"), has(r["choices"][0], "chat.choice"), has(r["choices"][0]["message"], "chat.message")
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    has(http.get("/v1/models").json()["data"][0], "model")
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 3, "stream": True}) as resp:
        events = sse_payloads(resp.iter_lines())
    for e in events[:-1]:
        assert e["object"] == "chat.completion.chunk"
        has(e, "chat"), has(e["choices"][0], "chunk.choice")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:-1])
    if server.proc is not None:  # start-up logged what it compiled and how long it took
        assert re.search(r"compiled \d+ programs in [\d.]+ ?s", server.log_text())


# ---------------------------------------------------------------- completions


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="smol", prompt="The capital of France is", max_tokens=24, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text and len(streamed) > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]


def test_usage_counts_match_tokenizer(client, http):
    prompt = "Write one sentence about the sea."
    out = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == len(tokenize(http, prompt))
    assert out.usage.completion_tokens == 12 == len(out.choices[0].logprobs.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.choices[0].finish_reason == "length"


def test_n3_and_list_prompts(client):
    out = client.completions.create(model="smol", prompt="Once upon a time", n=3, max_tokens=6, temperature=1.0,
                                    seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(c.text for c in out.choices)
    # Same seed, same request: same answers.
    again = client.completions.create(model="smol", prompt="Once upon a time", n=3, max_tokens=6, temperature=1.0,
                                      seed=7)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    many = client.completions.create(model="smol", prompt=["One", "Two"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both samples of "One" agree
    ids = client.completions.create(model="smol", prompt=[[504, 3575], [504]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2
    assert ids.usage.prompt_tokens == 3


def test_stop_strings(client):
    base = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0).choices[0].text
    assert " 6" in base, base
    out = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 6"])
    c = out.choices[0]
    assert c.finish_reason == "stop" and c.text == base[: base.index(" 6")]
    inc = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=" 6",
                                    extra_body={"include_stop_str_in_output": True})
    assert inc.choices[0].text == base[: base.index(" 6") + 2]
    streamed = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                         stop=[" 6"], stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.text


def test_echo_logprobs_loglikelihood(client, http):
    """lm-eval's loglikelihood request: token-id prompt, echo, logprobs=1, max_tokens=1."""
    ids = tokenize(http, "The capital of France is Paris")
    out = client.completions.create(model="smol", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    c = out.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert c.text.startswith("The capital of France is Paris")
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    # Streamed, the echo chunk carries the prompt's logprobs and the pieces add up to the same answer.
    chunks = [c for c in client.completions.create(model="smol", prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                                   temperature=0, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == c.text
    assert [t for ch in chunks for t in ch.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    # The echoed prompt's logprobs agree with generating that token: " Paris" after "... is". A logit
    # bias forces the token; reported logprobs are of the raw (unbiased) logits, so they must agree.
    head = client.completions.create(model="smol", prompt=ids[:-1], logprobs=1, max_tokens=1, temperature=0,
                                     logit_bias={str(ids[-1]): 100})
    assert head.choices[0].logprobs.tokens[0] == lp.tokens[len(ids) - 1]
    assert abs(head.choices[0].logprobs.token_logprobs[0] - lp.token_logprobs[len(ids) - 1]) < 1e-3


def test_streamed_echo_logprobs_of_a_prompt_longer_than_one_step(client, http):
    """The server's step budget is 128 tokens: a 300-token prompt is prefilled over three steps, and its
    echoed logprobs must arrive complete in the stream, equal to the non-streamed answer."""
    ids = tokenize(http, " ".join(f"word{i}" for i in range(150)))[:300]
    assert len(ids) == 300
    kw = dict(model="smol", prompt=ids, echo=True, logprobs=2, max_tokens=3, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert len(chunks[0].choices[0].logprobs.tokens) == 300  # the whole prompt, in its first chunk
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert len(streamed) == len(whole.logprobs.token_logprobs) == 303
    assert streamed[0] is None and all(x is not None for x in streamed[1:])
    np.testing.assert_allclose(streamed[1:], whole.logprobs.token_logprobs[1:], atol=1e-4)
    assert "".join(c.choices[0].text for c in chunks) == whole.text


def test_vllm_extras_accepted(client):
    out = client.completions.create(
        model="smol", prompt="Hello", max_tokens=5, temperature=0.8, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={"28": -100}, user="u1", seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 5,
                    "stop_token_ids": [2], "skip_special_tokens": True, "priority": 0})
    assert out.usage.completion_tokens == 5


def test_stream_usage_options(http):
    body = {"model": "smol", "prompt": "Count: 1, 2,", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "extra": "ignored"}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    used = [e["usage"]["completion_tokens"] for e in events[:-2]]
    assert used == sorted(used) and used[-1] == 5  # continuous usage grows chunk by chunk


# ---------------------------------------------------------------- chat


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"}]


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="smol", messages=MESSAGES, max_completion_tokens=20, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    chunks = list(client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]


def test_chat_logprobs_n_usage(client, http):
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi!"}], n=2,
                                         max_tokens=4, logprobs=True, top_logprobs=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert bytes(t.bytes).decode() == t.token
    chunks = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi!"}],
                                                 max_tokens=4, logprobs=True, top_logprobs=3, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    n_prompt = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi!"}]}).json()["count"]
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == 8


def test_chat_continue_final_message_and_tool_role(client, http):
    msgs = [{"role": "user", "content": "Say the alphabet."}, {"role": "assistant", "content": "A, B, C,"}]
    out = client.chat.completions.create(model="smol", messages=msgs, max_tokens=6, temperature=0,
                                         extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert out.choices[0].message.content
    echoed = client.chat.completions.create(model="smol", messages=msgs, max_tokens=6, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "echo": True})
    assert echoed.choices[0].message.content == "A, B, C," + out.choices[0].message.content
    streamed = client.chat.completions.create(model="smol", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                              extra_body={"continue_final_message": True,
                                                          "add_generation_prompt": False, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == echoed.choices[0].message.content
    tool = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Calling the tool."},
            {"role": "tool", "content": "sunny, 21C", "tool_call_id": "call_1"}]
    out = client.chat.completions.create(model="smol", messages=tool, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
    # The tool result really reached the model: the rendered prompt holds it, and its tokens are counted.
    legacy = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "user", "content": "Weather?"}, {"role": "function", "name": "get_weather", "content": "sunny"}]})
    assert legacy.status_code == 200, legacy.text  # the deprecated function role, accepted as vLLM does
    rendered = http.post("/tokenize", json={"messages": tool}).json()
    text = http.post("/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert "sunny, 21C" in text and out.usage.prompt_tokens == rendered["count"]


def test_structured_outputs_through_the_openai_sdk(client, http):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population_millions: int

    parsed = client.beta.chat.completions.parse(
        model="smol", messages=[{"role": "user", "content": "Give a city and its population as JSON."}],
        response_format=City, max_tokens=60, temperature=0)
    msg = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "stop" and isinstance(msg.parsed, City)
    choice = client.completions.create(model="smol", prompt="The best colour is", max_tokens=5, temperature=0.7,
                                       extra_body={"guided_choice": ["red", "green"]})
    assert choice.choices[0].text in ("red", "green")
    # Streamed json_object: the pieces add up to one JSON object.
    chunks = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "JSON please"}],
                                            response_format={"type": "json_object"}, max_tokens=80,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    for body, param in [({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "strin"}}}}, "response_format"),
            ({"guided_regex": "[a-"}, "guided_regex"),
            ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs")]:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **body})
        assert_error(r, 400, param=param)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_tool_calling_loop_required_named_and_streamed(client):
    import jsonschema

    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="smol", messages=msgs, tools=[WEATHER_TOOL],
                                           tool_choice="required", max_tokens=60, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    # The tool's result goes back; the final answer is plain text.
    msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
             {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = client.chat.completions.create(model="smol", messages=msgs, tools=[WEATHER_TOOL], tool_choice="none",
                                           max_tokens=20, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    named = client.chat.completions.create(
        model="smol", messages=msgs[:1], tools=[WEATHER_TOOL], max_tokens=60, temperature=0.7, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    args = json.loads(named.choices[0].message.tool_calls[0].function.arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    # Streamed: id and name first, then argument fragments; finish_reason tool_calls.
    chunks = [c for c in client.chat.completions.create(
        model="smol", messages=msgs[:1], tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60,
        temperature=0, stream=True) if c.choices]
    parts = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert parts[0].id.startswith("chatcmpl-tool-") and parts[0].function.name == "get_weather"
    assert all(p.id is None for p in parts[1:])  # the id goes out once, with the name
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    class Answer(BaseModel):
        city: str
        confident: bool

    llm = ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model="smol", temperature=0,
                     max_tokens=60, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Answer, method=method).invoke("Name a city as JSON.")
        assert isinstance(out, Answer), method


def test_embeddings_endpoint(client, http):
    import base64

    golden = json.load(open(os.path.join(os.path.dirname(__file__), "data", "goldens", "embeddings.json")))
    out = client.embeddings.create(model="smol", input=golden["prompts"])
    assert [d.index for d in out.data] == [0, 1, 2]
    for d, want in zip(out.data, golden["smollm2"], strict=True):  # the server pools the last token
        np.testing.assert_allclose(d.embedding, want["last"], atol=1e-4)
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(p) for p in golden["prompts"])
    text = client.embeddings.create(model="smol", input=["hello world", "bye"])
    one = client.embeddings.create(model="smol", input="hello world")
    np.testing.assert_allclose(one.data[0].embedding, text.data[0].embedding, atol=1e-5)
    r = http.post("/v1/embeddings", json={"input": "hello world", "encoding_format": "base64"})
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(raw, one.data[0].embedding, atol=1e-6)
    assert_error(http.post("/v1/embeddings", json={"input": "x", "dimensions": 3}), 400, param="dimensions")
    assert_error(http.post("/v1/embeddings", json={"input": []}), 400, param="input")
    assert_error(http.post("/v1/embeddings", json={"input": [[1, 10**7]]}), 400, param="input")


def test_beam_search_completions(client):
    out = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, n=3,
                                    extra_body={"use_beam_search": True, "ignore_eos": True})
    texts = [c.text for c in out.choices]
    assert len(texts) == 3 and len(set(texts)) == 3 and [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    with pytest.raises(openai.BadRequestError, match="use_beam_search"):
        client.completions.create(model="smol", prompt="Hi", max_tokens=2, n=2, stream=True,
                                  extra_body={"use_beam_search": True})


def test_chat_template_per_request(client, http):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi there"}],
                                         max_tokens=2, temperature=0, extra_body={"chat_template": template})
    assert out.usage.prompt_tokens == len(tokenize(http, "[user] Hi there\n"))
    bad = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "chat_template": "{% for %}"})
    assert_error(bad, 400, param="messages", contains="chat template")


def test_chat_stream_include_usage(client):
    chunks = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Yo"}],
                                                 max_tokens=3, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 3
    assert all(c.usage is None for c in chunks[:-1])


# ---------------------------------------------------------------- errors


def test_errors_are_openai_json(http):
    post = lambda body, path="/v1/completions": http.post(path, json=body)  # noqa: E731
    r = http.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert_error(r, 400, contains="JSON")
    assert_error(http.post("/v1/completions", content=b'{"prompt": "a", "temperature": NaN}'), 400)
    assert_error(post({"prompt": 5}), 400, "prompt")
    assert_error(post({"prompt": "a", "max_tokens": "ten"}), 400, "max_tokens")
    assert_error(post({"prompt": "a", "model": "gpt-4"}), 404, "model")
    err = assert_error(post({"prompt": "a", "max_tokens": 600}), 400, "max_tokens")
    assert "600" in err["message"] and str(MAX_LEN) in err["message"]
    assert_error(post({"prompt": "a", "logprobs": 21}), 400, "logprobs")
    assert_error(post({"prompt": "a", "n": 0}), 400, "n")
    assert_error(post({"prompt": ""}), 400, "prompt")
    assert_error(post({"prompt": []}), 400, "prompt")
    assert_error(post({"prompt": [1, 10**9]}), 400, "prompt", contains="vocab")
    assert_error(post({"prompt": "a", "stream_options": {"include_usage": True}}), 400, "stream_options")
    assert_error(post({"prompt": "a", "suffix": "b"}), 400, "suffix")
    assert_error(post({"prompt": "a", "temperature": -1}), 400, "temperature")
    assert_error(post({"messages": []}, "/v1/chat/completions"), 400, "messages")
    assert_error(post({"messages": [{"role": "wizard", "content": "x"}]}, "/v1/chat/completions"), 400, "messages")
    assert_error(post({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                      "/v1/chat/completions"), 400, "messages")
    assert_error(post({"messages": MESSAGES, "logprobs": True, "top_logprobs": 30}, "/v1/chat/completions"), 400,
                 "top_logprobs")
    err = assert_error(post({"messages": MESSAGES, "max_completion_tokens": 1000}, "/v1/chat/completions"), 400,
                       "max_completion_tokens")
    assert "1000" in err["message"] and str(MAX_LEN) in err["message"]
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.post("/v1/completions", json={"prompt": "x" * 70_000}), 413)
    assert http.get("/health").status_code == 200  # still serving


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="a", max_tokens=1, n=0)
    assert e.value.body["param"] == "n"


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=20)
                           | st.floats(allow_nan=False, allow_infinity=False), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
# Mostly near-valid values, so that requests reach SamplingParams and the engine, not just pydantic.
plausible = st.one_of(json_values, st.floats(-3, 3), st.integers(-3, 25), st.booleans(),
                      st.lists(st.integers(-3, 60_000), max_size=3), st.lists(st.text(max_size=3), max_size=3))
FIELDS = ["prompt", "n", "best_of", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "logprobs", "echo",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids",
          "min_tokens", "ignore_eos", "prompt_logprobs", "stream", "stream_options", "priority", "suffix", "model"]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({"max_tokens": st.integers(-2, 3)},
                                  optional={f: plausible for f in FIELDS}),
       prompt=st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 50_000), max_size=8)))
def test_no_client_input_gives_5xx(http, body, prompt):
    body.setdefault("prompt", prompt)
    r = http.post("/v1/completions", json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- load, disconnects, metrics (slow)


async def _stream_completion(client: httpx.AsyncClient, i: int) -> list:
    body = {"model": "smol", "prompt": f"Story number {i}:", "max_tokens": 12, "temperature": 0.7, "seed": i,
            "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        return sse_payloads([line async for line in r.aiter_lines()])


@pytest.mark.slow
def test_50_concurrent_streams_complete(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300,
                                     limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*(_stream_completion(c, i) for i in range(50)))

    results = asyncio.run(main())
    assert len(results) == 50
    for events in results:
        assert events[-1] == "[DONE]"
        finishes = [ch["finish_reason"] for e in events[:-1] for ch in e["choices"] if ch["finish_reason"]]
        assert len(finishes) == 1 and finishes[0] in ("stop", "length")


def _gauges(http) -> tuple[float, float, float]:
    text = http.get("/metrics").text
    return (metric_value(text, "vllm:num_requests_running"), metric_value(text, "vllm:num_requests_waiting"),
            metric_value(text, "vllm:kv_cache_usage_perc"))


@pytest.mark.slow
def test_100_disconnects_free_everything(server, http):
    before_abort = metric_value(http.get("/metrics").text, "vllm:request_success_total", finished_reason="abort")

    async def leave_early(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": "smol", "messages": [{"role": "user", "content": f"Tell a long tale #{i}"}],
                "max_tokens": 400, "stream": True, "ignore_eos": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    # Half leave after the role chunk (still waiting), half after real text (running).
                    if seen >= (1 if i % 2 else 2):
                        break

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as c:
            await asyncio.gather(*(leave_early(c, i) for i in range(100)))

    asyncio.run(main())
    deadline = time.time() + 10
    while time.time() < deadline and _gauges(http) != (0, 0, 0):
        time.sleep(0.2)
    assert _gauges(http) == (0, 0, 0)
    after_abort = metric_value(http.get("/metrics").text, "vllm:request_success_total", finished_reason="abort")
    assert after_abort - before_abort == 100


@pytest.mark.slow
def test_prefix_cache_hits_show_in_usage_metrics_and_reset(client, http):
    system = "You are a terse assistant. Answer with one word only, never more. " * 8
    ask = lambda q, **kw: client.chat.completions.create(  # noqa: E731
        model="smol", max_tokens=3, temperature=0, **kw,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
    text = http.get("/metrics").text
    hits0 = metric_value(text, "vllm:prefix_cache_hits_total", model_name="smol")
    first = ask("Sky colour?")
    second = ask("Grass colour?")
    salted = ask("Grass colour?", extra_body={"cache_salt": "other-tenant"})
    n_prompt = second.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Every full 16-token page of the shared system prompt is reused; the last token is always recomputed.
    shared = len(tokenize(http, system))
    assert shared - 32 <= cached <= n_prompt - 1 and cached % 16 == 0
    assert first.usage.prompt_tokens_details.cached_tokens < cached  # (earlier tests may have cached a bit)
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    assert salted.choices[0].message.content == second.choices[0].message.content
    hits = metric_value(http.get("/metrics").text, "vllm:prefix_cache_hits_total", model_name="smol")
    assert hits - hits0 >= cached
    r = http.post("/reset_prefix_cache")
    assert r.status_code == 200 and r.json()["pages_dropped"] > 0
    assert ask("Grass colour?").usage.prompt_tokens_details.cached_tokens == 0


def test_metrics_add_up(client, http):
    names = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:e2e_request_latency_seconds_count",
             "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
             "vllm:request_queue_time_seconds_count"]
    # vLLM's per-request histograms: one sample per finished request, sums that add up
    per_request = ["vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_n",
                   "vllm:request_params_max_tokens",
                   "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
                   "vllm:request_decode_time_seconds", "vllm:request_time_per_output_token_seconds",
                   "vllm:request_queue_time_seconds", "vllm:e2e_request_latency_seconds"]
    names += [f"{n}_{part}" for n in per_request for part in ("sum", "count") if f"{n}_{part}" not in names]

    def snap():
        text = http.get("/metrics").text
        vals = {n: metric_value(text, n, model_name="smol") for n in names}
        vals["length"] = metric_value(text, "vllm:request_success_total", finished_reason="length")
        return vals

    before = snap()
    prompt_tokens = 0
    for i in range(4):
        out = client.completions.create(model="smol", prompt=f"Item {i}: the", max_tokens=7, temperature=0,
                                        extra_body={"ignore_eos": True})
        prompt_tokens += out.usage.prompt_tokens
        assert out.usage.completion_tokens == 7
    after = snap()
    d = {k: after[k] - before[k] for k in after}
    assert d["vllm:prompt_tokens_total"] == prompt_tokens
    assert d["vllm:generation_tokens_total"] == 28
    assert d["length"] == 4
    assert d["vllm:e2e_request_latency_seconds_count"] == 4
    assert d["vllm:time_to_first_token_seconds_count"] == 4
    assert d["vllm:request_queue_time_seconds_count"] == 4
    assert d["vllm:inter_token_latency_seconds_count"] == 4 * 6
    for n in per_request:
        assert d[f"{n}_count"] == 4, n
    assert d["vllm:request_prompt_tokens_sum"] == prompt_tokens
    assert d["vllm:request_generation_tokens_sum"] == 28
    assert d["vllm:request_params_n_sum"] == 4
    assert d["vllm:request_params_max_tokens_sum"] == 4 * 7
    # one set of engine timestamps: arrival -> scheduled -> first token -> finished
    assert d["vllm:request_prefill_time_seconds_sum"] > 0 and d["vllm:request_decode_time_seconds_sum"] > 0
    assert d["vllm:request_inference_time_seconds_sum"] == pytest.approx(
        d["vllm:request_prefill_time_seconds_sum"] + d["vllm:request_decode_time_seconds_sum"], abs=1e-6)
    assert d["vllm:e2e_request_latency_seconds_sum"] == pytest.approx(
        d["vllm:request_queue_time_seconds_sum"] + d["vllm:request_inference_time_seconds_sum"], abs=1e-6)
    assert d["vllm:request_time_per_output_token_seconds_sum"] == pytest.approx(
        d["vllm:request_decode_time_seconds_sum"] / 6, rel=1e-6)
    text = http.get("/metrics").text
    assert metric_value(text, "jaxllm:num_compiles") > 0
    assert metric_value(text, "jaxllm:num_recompiles_after_warmup") == 0
    assert metric_value(text, "vllm:iteration_tokens_total_count") > 0


def test_serving_builds_no_xla_program_after_start_up(client, http):
    """Warm-up builds every program: a concurrent mix of the sampling features (n, best_of, seeds,
    penalties, logit_bias, min_tokens, logprobs and prompt logprobs of a prompt longer than a step,
    stop strings, streaming, JSON mode, required tools, embeddings) builds none, counted by XLA itself
    (eager ops included), not only the step shapes the engine tracks."""
    import concurrent.futures

    def built() -> float:
        return metric_value(http.get("/metrics").text, "jaxllm:xla_programs_built_total")

    long = "Tell me a long story about a dragon and a knight. " * 30
    calls = [
        lambda: client.completions.create(model="smol", prompt="Hello", max_tokens=8, n=3, temperature=0.8, seed=1),
        lambda: client.completions.create(model="smol", prompt=long, max_tokens=4, echo=True, logprobs=3,
                                          extra_body={"prompt_logprobs": 2}),
        lambda: client.completions.create(model="smol", prompt="The sky is", max_tokens=12, presence_penalty=0.5,
                                          frequency_penalty=0.3, logit_bias={"13": -100}),
        lambda: client.completions.create(model="smol", prompt="List: 1,", max_tokens=20, stop=[","], best_of=3,
                                          n=2, temperature=0.7),
        lambda: client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=16, logprobs=True, top_logprobs=5,
                                               extra_body={"min_tokens": 5, "repetition_penalty": 1.2}),
        lambda: list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "count"}],
                                                    max_tokens=20, stream=True,
                                                    stream_options={"include_usage": True})),
        lambda: client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Give JSON"}],
                                               max_tokens=20, response_format={"type": "json_object"}),
        lambda: client.chat.completions.create(model="smol", max_tokens=60, tools=[WEATHER_TOOL],
                                               tool_choice="required",
                                               messages=[{"role": "user", "content": "weather in Paris?"}]),
        lambda: client.embeddings.create(model="smol", input=["a", "b c"]),
    ]
    before = built()
    assert before > 0  # warm-up's builds are counted
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = [f.result() for f in [pool.submit(call) for call in calls * 2]]
    assert len(results) == 2 * len(calls)
    assert built() == before


def test_sigterm_drains_in_flight_then_exits_zero(server, http):
    """Last in the module: it stops the shared server."""
    if server.proc is None:
        pytest.skip("external server")
    body = {"model": "smol", "prompt": "Let me explain", "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert_error(httpx.post(server.base_url + "/v1/completions", json={"prompt": "late"}), 503)
        events = sse_payloads([first, *lines])
    assert events[-1] == "[DONE]"
    assert sum(len(e["choices"]) for e in events[:-1]) >= 1
    assert [ch["finish_reason"] for e in events[:-1] for ch in e["choices"] if ch["finish_reason"]] == ["length"]
    assert server.proc.wait(60) == 0
