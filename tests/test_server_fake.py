"""Server failure paths against a fake engine (tests/server_support.py): auth, body limits, back-pressure,
an engine failure mid-stream, SIGTERM draining. Seconds, not minutes: no model is loaded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.server_support import ROOT, ServerProcess, metric_value, sse_payloads

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server():
    # The key comes from the environment (JAXLLM_API_KEY), the flag's documented fallback.
    srv = ServerProcess(["--max-num-seqs", "2", "--max-waiting-requests", "3", "--max-model-len", "256",
                         "--max-request-bytes", "4096", "--drain-timeout", "20"],
                        module="tests.server_support", env={"JAXLLM_API_KEY": KEY})
    srv.wait_ready(120)
    yield srv
    srv.stop()


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_health_was_503_while_building(server):
    assert server.health_503_before_ready  # the port was bound before the (slow) engine existed


def test_api_key_required(server):
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hi"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    # /health and /metrics stay open for probes and Prometheus.
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_openai_client_with_key(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY)
    out = client.completions.create(model="fake-model", prompt="hello", max_tokens=5)
    assert out.choices[0].text == "abcde"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 5  # <s> + 5 bytes
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope").models.list()


def test_body_too_large(server):
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    r = httpx.post(server.base_url + "/v1/completions", json=big, headers=auth())
    assert r.status_code == 413
    assert "4096" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must hold while reading
        yield json.dumps(big).encode()

    r = httpx.post(server.base_url + "/v1/completions", content=chunks(), headers=auth())
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_back_pressure_503_with_retry_after(server):
    async def one(client, i):
        return await client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 30})

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth(), timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 3
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"]
            assert r.json()["error"]["code"] == 503
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    # Still serving after the burst.
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200


def test_engine_failure_mid_stream(server):
    with httpx.stream("POST", server.base_url + "/v1/completions", headers=auth(), timeout=30,
                      json={"prompt": "please FAIL", "max_tokens": 10, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    assert len(errors) == 1 and events[-2] is errors[0]
    assert "injected engine failure" in errors[0]["error"]["message"]
    assert any(e.get("choices") for e in events[:-2])  # some text went out before the failure
    # The server keeps serving others.
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "fine", "max_tokens": 3}, headers=auth())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"


def test_bad_structured_outputs_and_tools_are_400s_naming_the_field(server):
    url = server.base_url
    cases = [("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
             ("/v1/chat/completions", {"tools": [{"type": "function"}], "tool_choice": "required"}, "tools"),
             ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
             ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
             ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
              "response_format"),
             ("/v1/completions", {"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
             ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
             ("/v1/completions", {"guided_choice": []}, "guided_choice")]
    for path, extra, param in cases:
        body = {"max_tokens": 2, **extra}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
        r = httpx.post(url + path, json=body, headers=auth())
        assert r.status_code == 400, (param, r.text)
        assert r.json()["error"]["param"] == param
    # What stays allowed: plain text format, tool_choice "none", and null for nullable fields.
    r = httpx.post(url + "/v1/chat/completions", headers=auth(), json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "response_format": {"type": "text"},
        "tool_choice": "none", "stream": None, "n": None, "temperature": None, "stop": None})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"


def test_engine_thread_death_fails_streams_and_exits_nonzero():
    srv = ServerProcess([], module="tests.server_support", env={"FAKE_WARMUP_S": "0.2"})
    try:
        srv.wait_ready(60)
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=30,
                          json={"prompt": "please DIE", "max_tokens": 10, "stream": True}) as r:
            events = sse_payloads(r.iter_lines())
        assert events[-1] == "[DONE]" and "engine died" in events[-2]["error"]["message"]
        assert srv.proc.wait(20) == 1  # a supervisor sees the failure and restarts the server
    finally:
        srv.stop()


def test_metrics_from_fake_engine(server):
    """The counters move by exactly this test's own requests (it runs alone as well as after others)."""
    def scrape(name: str, **labels) -> float:
        return metric_value(httpx.get(server.base_url + "/metrics").text, name, **labels)

    deadline = time.monotonic() + 20
    while scrape("vllm:num_requests_running") + scrape("vllm:num_requests_waiting") and time.monotonic() < deadline:
        time.sleep(0.05)  # earlier tests' requests may still be finishing
    before = scrape("vllm:request_success_total", finished_reason="length")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY)
    for _ in range(2):
        assert client.completions.create(model="fake-model", prompt="hi", max_tokens=3).choices[0].finish_reason == "length"
    assert scrape("vllm:request_success_total", finished_reason="length") - before == 2
    assert scrape("jaxllm:num_compiles", model_name="fake-model") == 3


def test_grafana_dashboard_uses_exported_metrics(server):
    import re

    with open(os.path.join(ROOT, "configs", "grafana_dashboard.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_bucket$", "", m) for e in exprs for m in re.findall(r"(?:vllm|jaxllm):[a-z_]+", e)}
    exported = set(re.findall(r"^# TYPE ((?:vllm|jaxllm):[a-z_]+)", httpx.get(server.base_url + "/metrics").text, re.M))
    # Counters are declared without their _total suffix in the TYPE line.
    exported |= {n + "_total" for n in exported}
    assert len(used) >= 12 and used <= exported, used - exported


def _bench(server, tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve.py"), "--base-url", server.base_url,
                           "--api-key", KEY, "--result-json", str(out), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mean_ttft_ms" in proc.stdout
    return json.loads(out.read_text())


def test_bench_serve_random(server, tmp_path):
    r = _bench(server, tmp_path, "--dataset", "random", "--num-prompts", "6", "--random-input-len", "8",
               "--random-output-len", "5", "--random-vocab-size", "200", "--max-concurrency", "2",
               "--request-rate", "40", "--ignore-eos")
    assert r["completed"] == 6 and r["failed"] == 0
    assert r["total_output_tokens"] == 30 and r["total_input_tokens"] == 48
    assert 0 < r["median_ttft_ms"] <= r["median_e2el_ms"]
    # Fake engine: ~20 ms per step, so each token gap is at least a step.
    assert r["mean_tpot_ms"] >= 15 and r["p99_itl_ms"] >= r["median_itl_ms"] > 0
    assert r["output_throughput"] == pytest.approx(30 / r["duration_s"])


def test_bench_serve_sharegpt(server, tmp_path):
    r = _bench(server, tmp_path, "--dataset", "sharegpt", "--num-prompts", "4", "--sharegpt-output-len", "4",
               "--max-model-len", "256", "--max-concurrency", "2")
    assert r["completed"] == 4 and r["total_output_tokens"] == 16
    # Prompts are real ShareGPT text, counted with the server's own tokenizer (bytes + <s> here).
    assert all(p["prompt_len"] >= 4 for p in r["per_request"])


def test_bench_serve_multiturn(server, tmp_path):
    r = _bench(server, tmp_path, "--dataset", "multiturn", "--num-prompts", "3", "--turns", "3",
               "--turn-chars", "30", "--sharegpt-output-len", "4", "--ignore-eos", "--max-concurrency", "2")
    assert r["completed"] == 9 and r["failed"] == 0 and r["total_output_tokens"] == 36, r.get("errors")
    chats = [r["per_request"][i:i + 3] for i in range(0, 9, 3)]
    for chat in chats:
        assert [t["turn"] for t in chat] == [0, 1, 2]
        # Each turn resends the previous prompt, its 4-token reply and a new message.
        assert chat[0]["prompt_len"] + 4 < chat[1]["prompt_len"] and chat[1]["prompt_len"] + 4 < chat[2]["prompt_len"]
    assert r["median_ttft_later_turns_ms"] > 0 and r["median_ttft_first_turn_ms"] > 0
    assert len(r["median_ttft_by_turn_ms"]) == 3 and min(r["median_ttft_by_turn_ms"]) > 0
    assert r["mean_prompt_tokens_by_turn"] == [
        pytest.approx(sum(c[t]["prompt_len"] for c in chats) / 3, abs=0.05) for t in range(3)]
    assert all(u <= p for u, p in zip(r["mean_uncached_prompt_tokens_by_turn"], r["mean_prompt_tokens_by_turn"],
                                      strict=True))


def test_bench_serve_multiturn_own_reply_lengths(server, tmp_path):
    """Without --sharegpt-output-len each reply is as long as the chat's own (cut to --max-reply-len)."""
    r = _bench(server, tmp_path, "--dataset", "multiturn", "--num-prompts", "3", "--turns", "2",
               "--turn-chars", "30", "--max-reply-len", "12", "--ignore-eos", "--max-concurrency", "3")
    assert r["completed"] == 6 and r["failed"] == 0, r.get("errors")
    assert all(4 <= t["output_tokens"] <= 12 for t in r["per_request"]), r["per_request"]


def test_multiturn_reply_lengths_follow_the_chats():
    from benchmarks.datasets import iter_sharegpt_records, load_sharegpt_text, sample_multiturn

    class Words:
        def encode(self, text):
            return text.split()

    convs = sample_multiturn(5, turns=3, output_len=None, tokenizer=Words(), max_reply_len=100, max_total_len=900)
    assert len(convs) == 5
    replies = {}
    for rec in iter_sharegpt_records(load_sharegpt_text()):
        msgs = rec.get("conversations", [])
        human = [(m["value"][:400], msgs[i + 1]["value"]) for i, m in enumerate(msgs[:-1])
                 if m.get("from") == "human" and msgs[i + 1].get("from") == "gpt"][:3]
        replies.setdefault(tuple(h for h, _ in human), [min(100, len(g.split())) for _, g in human])
    for conv in convs:
        assert conv.output_lens == replies[tuple(conv.user_turns)]
        assert sum(len(u.split()) + 8 for u in conv.user_turns) + sum(conv.output_lens) <= 900
    assert len({n for c in convs for n in c.output_lens}) > 1  # not one fixed length
    assert sample_multiturn(2, turns=3, output_len=7)[0].output_lens == [7, 7, 7]


def test_cli_entry_points():
    help_text = subprocess.run([sys.executable, "-m", "jaxllm.cli", "serve", "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=120)
    assert help_text.returncode == 0
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--kv-cache-memory", "--dtype", "--seed", "--tensor-parallel-size",
                 "--max-waiting-requests", "--max-request-bytes", "--drain-timeout"):
        assert flag in help_text.stdout, flag
    bad = subprocess.run([sys.executable, "-m", "jaxllm.cli", "frobnicate"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_port_in_use_fails_fast(server):
    proc = subprocess.run([sys.executable, "-m", "tests.server_support", "--port", str(server.port)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1 and "cannot listen" in proc.stderr


def test_sigterm_during_warmup_exits_zero():
    srv = ServerProcess([], module="tests.server_support", env={"FAKE_WARMUP_S": "60"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                r = httpx.get(srv.base_url + "/health")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert httpx.get(srv.base_url + "/v1/models").status_code == 503
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(15) == 0
    finally:
        srv.stop()


def test_sigterm_drains_then_exits_zero(server):
    """Runs last in this module: the server is gone afterwards."""
    with httpx.stream("POST", server.base_url + "/v1/completions", headers=auth(), timeout=60,
                      json={"prompt": "long", "max_tokens": 60, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(server.base_url + "/v1/completions", json={"prompt": "new", "max_tokens": 2},
                             headers=auth())
        assert refused.status_code == 503
        assert httpx.get(server.base_url + "/health").status_code == 503
        events = sse_payloads([first, *lines])
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    assert len(text) == 60  # the in-flight request finished completely
    assert server.proc.wait(30) == 0
