"""Prometheus metrics with vLLM V1's names (so existing vLLM Grafana dashboards work) on a per-app registry.

Engine-level numbers (running/waiting, KV usage, token and preemption totals, compile counts) are read
from the engine's latest stats snapshot at scrape time; per-request latencies are observed on the engine
thread as outputs appear (prometheus_client objects are thread-safe).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket edges copied from vLLM's V1 loggers so dashboards' quantiles line up.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0]
_ITER_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_TOKEN_BUCKETS = [m * 10 ** e for e in range(7) for m in (1, 2, 5)]  # vLLM's 1-2-5 series
_N_BUCKETS = [1, 2, 5, 10, 20]
_FINISH_REASONS = ("stop", "length", "abort")


class _XlaBuilds:
    """XLA executables built in this process, compiled or read from the persistent compilation cache,
    counted through jax.monitoring's event around every build. Warm-up builds them all; afterwards the
    count stays flat while serving, and a rise means a request path built a program that every stream
    waited for: a step shape outside the ShapeTable (which the engine also counts itself) or any other
    jitted or eager op on device arrays (which only this sees)."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    count = 0
    _installed = False
    _lock = threading.Lock()

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            import jax.monitoring
            jax.monitoring.register_event_duration_secs_listener(cls._on_event)
            cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **kwargs) -> None:
        if event == cls.EVENT:
            with cls._lock:
                cls.count += 1


class _Live:
    __slots__ = ("arrival", "last_time", "num_tokens")

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.last_time: float | None = None
        self.num_tokens = 0


class _EngineCollector:
    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        s = m.stats_source() if m.stats_source else None
        # One sample per engine replica (vLLM's "engine" label); a single engine is engine "0".
        engines = (list(enumerate(s.replicas)) if s is not None and getattr(s, "replicas", None)
                   else [(0, s)])

        def gauge(name, doc, key, value=None):
            g = GaugeMetricFamily(name, doc, labels=["model_name", "engine"])
            for i, st in engines:
                g.add_metric([m.model_name, str(i)], float((getattr(st, key, 0) if st is not None else 0) or 0)
                             if value is None else value)
            return g

        def counter(name, doc, key):
            c = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
            for i, st in engines:
                c.add_metric([m.model_name, str(i)], float((getattr(st, key, 0) if st is not None else 0) or 0))
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", "num_running")
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting")
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).",
                    "kv_cache_usage")
        yield counter("vllm:num_preemptions", "Preemptions since start.", "num_preemptions_total")
        yield counter("vllm:prompt_tokens", "Prefill tokens processed.", "prompt_tokens_total")
        yield counter("vllm:generation_tokens", "Tokens generated.", "generation_tokens_total")
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      "prefix_cache_queries")
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      "prefix_cache_hits")
        yield gauge("jaxllm:num_compiles", "XLA programs compiled (warm-up included).", "num_compiles")
        yield gauge("jaxllm:num_recompiles_after_warmup", "Compiles after warm-up (should stay 0).",
                    "num_recompiles_after_warmup")
        builds = CounterMetricFamily("jaxllm:xla_programs_built", "XLA executables built in this process "
                                     "(compiled or read from the compilation cache; flat while serving).",
                                     labels=["model_name"])
        builds.add_metric([m.model_name], float(_XlaBuilds.count))
        yield builds
        yield gauge("jaxllm:warmup_seconds", "Seconds spent compiling at start-up.", "warmup_seconds")
        yield gauge("jaxllm:engine_ready", "1 once the engine has finished warm-up.", None,
                    1 if s is not None else 0)


class Metrics:
    """Implements the AsyncEngine observer hooks and renders /metrics."""

    def __init__(self, model_name: str = "unknown", stats_source=None):
        self.model_name = model_name
        self.stats_source = stats_source  # callable returning the latest EngineStats (or None)
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self._histograms: list[Histogram] = []  # each exported with zero counts from the first scrape

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            h = Histogram(name, doc, labels, buckets=buckets, registry=r)
            self._histograms.append(h)
            return h

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", _E2E_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", _E2E_BUCKETS)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Tokens per engine step.", _ITER_BUCKETS)
        # Per finished request, as vLLM's V1 logger records them: where its time went and its size.
        self.inference_time = histogram("vllm:request_inference_time_seconds", "First scheduled to finish.",
                                        _E2E_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds", "First scheduled to first token.",
                                      _E2E_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds", "First token to finish.", _E2E_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "A request's decode time over its output tokens after the first.", _ITL_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per request (all its choices).", _TOKEN_BUCKETS)
        self.request_params_n = histogram("vllm:request_params_n", "Choices (n) per request.", _N_BUCKETS)
        self.request_params_max_tokens = histogram("vllm:request_params_max_tokens", "max_tokens per request.",
                                                   _TOKEN_BUCKETS)
        _XlaBuilds.install()  # before the engine warms up, so that its builds are counted too
        r.register(_EngineCollector(self))
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._recently_finished: OrderedDict[str, None] = OrderedDict()

    def _labels(self, h):
        return h.labels(model_name=self.model_name)

    def set_model_name(self, name: str) -> None:
        self.model_name = name
        for reason in _FINISH_REASONS:  # export zeros so rate() works from the first scrape
            self.request_success.labels(model_name=name, finished_reason=reason)
        for h in self._histograms:
            self._labels(h)

    # ---------------------------------------------------------------- observer hooks (engine thread)

    def on_step(self, stats: Any, outputs: list, now: float) -> None:
        tokens = getattr(stats, "last_iteration_tokens", None)
        if tokens:
            self._labels(self.iteration_tokens).observe(tokens)
        with self._lock:
            for out in outputs:
                self._on_output(out, now)

    def _on_output(self, out: Any, now: float) -> None:
        if out.request_id in self._recently_finished:
            return  # aborted by the client and already counted (the engine may still report it)
        m = getattr(out, "metrics", None)
        live = self._live.get(out.request_id)
        if live is None:
            live = self._live[out.request_id] = _Live(m.arrival_time if m and m.arrival_time else now)
            if m is not None and m.first_scheduled_time:
                self._labels(self.queue_time).observe(max(0.0, m.first_scheduled_time - live.arrival))
        # Outputs may be deltas or final-only: the request's own count is what is cumulative.
        n_tokens = m.num_generation_tokens if m is not None else sum(
            len(c.token_ids) for c in (out.outputs if isinstance(out.outputs, list) else []))
        if n_tokens > live.num_tokens:
            # Outputs may come every step (streams) or once at the end (final-only): the gaps are
            # spread over the tokens produced since the previous output, from the engine's timestamps.
            new = n_tokens - live.num_tokens
            last = m.last_token_time if m is not None and m.last_token_time else now
            if live.last_time is None:
                first = m.first_token_time if m is not None and m.first_token_time else now
                self._labels(self.ttft).observe(max(0.0, first - live.arrival))
                live.last_time = first
                new -= 1
            if new > 0:
                gap = max(0.0, last - live.last_time) / new
                for _ in range(new):
                    self._labels(self.itl).observe(gap)
            live.last_time = last
            live.num_tokens = n_tokens
        if out.finished:
            del self._live[out.request_id]
            self._remember_finished(out.request_id)
            end = m.finished_time if m is not None and m.finished_time else now
            self._labels(self.e2e).observe(max(0.0, end - live.arrival))
            comps = out.outputs if isinstance(out.outputs, list) else []  # an embedding has no completions
            self._observe_finished(out, m, end, len(comps), live.num_tokens)
            reasons = [c.finish_reason or "stop" for c in comps] or ["stop"]
            reason = "abort" if "abort" in reasons else ("length" if "length" in reasons else "stop")
            self.request_success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def _observe_finished(self, out: Any, m: Any, end: float, n_choices: int, n_tokens: int) -> None:
        self._labels(self.request_prompt_tokens).observe(len(out.prompt_token_ids))
        if n_choices:
            self._labels(self.request_generation_tokens).observe(n_tokens)
            self._labels(self.request_params_n).observe(n_choices)
            if m is not None and m.max_tokens_param is not None:
                self._labels(self.request_params_max_tokens).observe(m.max_tokens_param)
        scheduled = m.first_scheduled_time if m is not None else None
        if not scheduled:
            return
        self._labels(self.inference_time).observe(max(0.0, end - scheduled))
        first = m.first_token_time
        if first and n_choices:
            decode = max(0.0, end - first)
            self._labels(self.prefill_time).observe(max(0.0, first - scheduled))
            self._labels(self.decode_time).observe(decode)
            if n_tokens > 1:
                self._labels(self.request_tpot).observe(decode / (n_tokens - 1))

    def _remember_finished(self, request_id: str) -> None:
        self._recently_finished[request_id] = None
        while len(self._recently_finished) > 4096:
            self._recently_finished.popitem(last=False)

    def on_abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._recently_finished:
                return  # finished in the same step the client left; already counted
            self._live.pop(request_id, None)
            self._remember_finished(request_id)
            self.request_success.labels(model_name=self.model_name, finished_reason="abort").inc()

    # ---------------------------------------------------------------- scrape

    def render(self) -> bytes:
        return generate_latest(self.registry)


