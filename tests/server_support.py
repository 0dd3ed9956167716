"""Helpers for the server tests: a subprocess server on a free port, SSE parsing, and a fake engine.

The fake engine honours LLMEngine's contract (add_request / step / abort_request / get_stats, outputs by output_kind
RequestOutputs) with a byte tokenizer and canned text, so failure paths that the real model cannot
trigger on demand (a step that raises, a full waiting queue, draining) are testable in seconds.
Run it as a server: `python -m tests.server_support [serve flags]`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m MODULE ARGS --port P` in a subprocess, logging to a temp file (a full pipe would block it)."""

    def __init__(self, args: list[str], *, module: str = "jaxllm.serve", env: dict | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jaxllm-server-", suffix=".log", delete=False)
        # A key in the caller's environment must not leak into servers that are meant to be open.
        full_env = {k: v for k, v in os.environ.items() if k != "JAXLLM_API_KEY"}
        full_env.update({"PYTHONPATH": ROOT, **(env or {})})
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args, "--port", str(self.port)], cwd=ROOT,
                                     env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        seen_503 = False
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                r = httpx.get(self.base_url + "/health", timeout=2)
                if r.status_code == 200:
                    self.health_503_before_ready = seen_503
                    return
                seen_503 |= r.status_code == 503
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def sse_payloads(lines) -> list:
    """The `data:` payloads of an SSE stream, JSON-decoded except the final "[DONE]"."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (Prometheus text format)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"metric {name} {labels} not exported"
    return total


# ---------------------------------------------------------------- the fake engine


class FakeTokenizer:
    """Bytes are tokens 0..255; 256 = </s>, 257 = <s>."""

    eos_token_id, bos_token_id = 256, 257
    eos_token, bos_token = "</s>", "<s>"
    vocab_size = 258
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        specials = {256: "</s>", 257: "<s>"}
        data, out = bytearray(), []
        for i in ids:
            if i in specials:
                out.append(data.decode("utf-8", "replace"))
                data = bytearray()
                if not skip_special_tokens:
                    out.append(specials[i])
            else:
                data.append(i)
        out.append(data.decode("utf-8", "replace"))
        return "".join(out)

    def id_to_piece_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt=True, continue_final_message=False, tools=None,
                            **kwargs) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    last_iteration_tokens: int = 0
    num_compiles: int = 3
    num_recompiles_after_warmup: int = 0
    warmup_seconds: float = 0.1
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    healthy: bool = True


class FakeEngine:
    """Each step sleeps STEP_S and gives every running sequence one letter; a prompt containing FAIL makes
    the step raise once that request has two tokens."""

    STEP_S = 0.02

    def __init__(self, config):
        self.tokenizer = FakeTokenizer()
        self.model_name = config.model.served_model_name or "fake-model"
        self.max_model_len = config.model.max_model_len or 256
        self.max_running = config.scheduler.max_num_seqs
        self.requests: dict[str, dict] = {}
        self.stats = FakeStats()
        self.healthy = True
        self._aborted = []
        # "Compiling": the server must answer /health 503 meanwhile.
        time.sleep(float(os.environ.get("FAKE_WARMUP_S", "1.0")))

    def add_request(self, request_id, prompt, params, *, prompt_token_ids=None, priority=0, arrival_time=None,
                    cache_salt=None):
        from jaxllm.outputs import RequestMetrics
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
            raise ValueError("prompt token id out of the vocabulary")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len")
        self.requests[request_id] = {"ids": ids, "params": params, "prompt": prompt or "", "n_out": 0,
                                     "metrics": RequestMetrics(arrival_time or time.time())}

    def abort_request(self, request_ids):
        # As the real engine: a final output with finish_reason "abort" for each request still known.
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            r = self.requests.pop(rid, None)
            if r is not None:
                self._aborted.append(self._output(rid, r, "abort"))

    def reset_prefix_cache(self) -> int:
        return 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted)

    def launch_delay(self) -> float:
        return 0.0  # no step in flight to wait out

    def _output(self, rid, r, finish):
        """The output a real engine gives for this request's output_kind (deltas only carry what is new)."""
        import dataclasses

        from jaxllm.outputs import CompletionOutput, RequestOutput
        from jaxllm.sampling_params import RequestOutputKind
        n_out, p = r["n_out"], r["params"]
        done = finish is not None
        if p.output_kind is RequestOutputKind.FINAL_ONLY and not done:
            return None
        first = n_out - 1 if (p.output_kind is RequestOutputKind.DELTA and n_out) else 0
        if p.output_kind is RequestOutputKind.DELTA and finish == "abort":
            first = n_out
        tokens = [ord("a") + i % 26 for i in range(first, n_out)]
        outs = [CompletionOutput(j, self.tokenizer.decode(tokens), list(tokens), finish_reason=finish)
                for j in range(p.n)]
        return RequestOutput(rid, r["prompt"], r["ids"], outs, done, metrics=dataclasses.replace(r["metrics"]))

    def get_stats(self):
        running = min(len(self.requests), self.max_running)
        s = self.stats
        s.num_running, s.num_waiting = running, len(self.requests) - running
        s.kv_cache_usage = running / max(1, self.max_running)
        return FakeStats(**vars(s))

    def step(self):
        time.sleep(self.STEP_S)
        outputs, self._aborted = self._aborted, []
        now = time.time()
        running = list(self.requests.items())[: self.max_running]
        self.stats.last_iteration_tokens = len(running)
        for rid, r in running:
            if "FAIL" in r["prompt"] and r["n_out"] >= 2:
                raise RuntimeError("injected engine failure")
            if "DIE" in r["prompt"] and r["n_out"] >= 2:
                raise SystemExit("injected death of the engine thread")
            m = r["metrics"]
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
                self.stats.prompt_tokens_total += len(r["ids"])
            r["n_out"] += 1
            self.stats.generation_tokens_total += r["params"].n
            m.num_generation_tokens += r["params"].n
            m.first_token_time = m.first_token_time or now
            m.last_token_time = now
            done = r["n_out"] >= r["params"].max_tokens
            if done:
                m.finished_time = now
                del self.requests[rid]
            out = self._output(rid, r, "length" if done else None)
            if out is not None:
                outputs.append(out)
        return outputs


if __name__ == "__main__":
    from jaxllm.serve import main

    sys.exit(main(sys.argv[1:], engine_factory=FakeEngine))
