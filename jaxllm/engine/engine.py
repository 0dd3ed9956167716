"""LLMEngine: add_request / step / abort_request over the scheduler and the model runner.

One `step()` runs the typed stages: Scheduler -> SchedulerOutput -> ModelRunner (ragged batch, jitted
forward + sampling) -> sampled tokens -> OutputProcessor (stop conditions, detokenization) ->
RequestOutputs for requests that moved. With async scheduling the device runs one step behind the host.
A failed step fails its own requests and the device state is rebuilt (`_recover`).
Not thread-safe: the server's AsyncEngine drives it from one engine thread.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import sharding
from pallas_kernels.ragged_paged_attention import cpu as attention_cpu
from jaxllm.config import EngineConfig, default_cache_dir
from jaxllm.engine.kv_pages import PagePool
from jaxllm.engine.launch_pacer import LaunchPacer
from jaxllm.engine.output_processor import OutputProcessor
from jaxllm.engine.request import Request, Sequence
from jaxllm.engine.runner import LogitsRow, ModelRunner
from jaxllm.engine.sampler import RowSpec
from jaxllm.engine.scheduler import Scheduler, SchedulerOutput
from jaxllm.engine.structured_output import GrammarCompiler, fill_mask, mask_words
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger(__name__)

_CPU_KV_BUDGET = 1 << 30  # bytes; the CPU default pool is the smaller of this and what max_num_seqs needs


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    last_iteration_tokens: int
    num_compiles: int
    num_recompiles_after_warmup: int
    warmup_seconds: float
    prefix_cache_queries: int = 0  # tokens of newly admitted prompts
    prefix_cache_hits: int = 0  # of which found in the prefix cache
    healthy: bool = True
    replicas: list | None = None  # data parallel: each replica's own EngineStats (metrics' engine label)


def enable_persistent_compilation_cache(cache_dir: str | None) -> None:
    """JAX's on-disk cache of compiled programs makes a restart skip XLA compilation."""
    path = cache_dir or os.path.join(default_cache_dir(), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_for(config: EngineConfig, mesh=None) -> "models.LoadedModel":
    """Converts (or restores from the param cache) the model `config` names, with its runtime options;
    with a mesh, each weight goes straight into its tensor-parallel sharding there."""
    if config.compile.persistent_cache:
        enable_persistent_compilation_cache(config.compile.cache_dir)
    param_cache = None
    if config.compile.param_cache:
        param_cache = os.path.join(config.compile.cache_dir or default_cache_dir(), "params")
    return models.load_model(config.model.model, dtype=jnp.dtype(_resolve_dtype(config.model.dtype)).name,
                             param_cache=param_cache, quantization=config.model.quantization,
                             attention_backend=config.model.attention_backend,
                             attention_interpret=config.model.attention_interpret,
                             expert_parallel=config.parallel.enable_expert_parallel, mesh=mesh)


# --kv-cache-dtype (vLLM's names): int8 / fp8 pools store a scale per token and K/V head, ~2x the
# tokens of a bfloat16 pool (~4x float32) in the same memory.
KV_CACHE_DTYPES = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8,
                   "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def _resolve_dtype(name: str) -> jnp.dtype:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
            "float16": jnp.float16, "half": jnp.float16}[name]


def _auto_kv_dtype(dtype, loaded: models.LoadedModel) -> jnp.dtype:
    """--kv-cache-dtype auto: the model dtype, as in vLLM, except bfloat16 where quantized weights run on
    AMX tiles and the attention would too (`-q gguf` on a Xeon with AMX-BF16). Those projections already
    meet their activations in bfloat16 or int8, so a float32 pool keeps no exactness the weights have
    not given up, at twice the bytes and ~1.7x (decode) to ~2.5x (prefill) the attention time
    (llama.cpp's default cache is float16 for the same reason)."""
    c = loaded.config
    if loaded.on_amx_tiles and attention_cpu.bf16_pool_on_tiles(c.num_heads, c.num_kv_heads, c.head_dim,
                                                                c.attn_logit_softcap):
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(dtype)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, *, mesh=None, loaded: models.LoadedModel | None = None,
                 mirror=None, **flags):
        """mesh: a ("data", "model") mesh of shape (1, tensor_parallel_size) to run on (data-parallel
        replicas get one each); default: the first tensor_parallel_size devices. loaded: an already
        converted model (its parameters are moved onto `mesh`). mirror: many hosts, rank 0: sends every
        device call to the other ranks (engine/multihost.py)."""
        self.config = config = config or EngineConfig.from_flags(**flags)
        par = config.parallel
        if par.data_parallel_size != 1:
            raise ValueError("data_parallel_size > 1 runs several engines: use "
                             "jaxllm.engine.data_parallel.create_engine / DataParallelEngine")
        if par.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {par.tensor_parallel_size}")
        if config.cache.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {config.cache.kv_cache_dtype!r}")
        t0 = time.perf_counter()
        if config.compile.persistent_cache:
            enable_persistent_compilation_cache(config.compile.cache_dir)
        dtype = _resolve_dtype(config.model.dtype)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(par.tensor_parallel_size, 1)
        self.loaded = loaded if loaded is not None else load_for(config, self.mesh)
        self.model_config = self.loaded.config
        sharding.check_tensor_parallel(self.model_config, par.tensor_parallel_size)
        # A no-op for weights loaded into their shards; moves a model loaded elsewhere (a DP replica's copy).
        sharding.shard_model(self.loaded.model, self.mesh, expert_parallel=par.enable_expert_parallel)
        self.tokenizer = load_tokenizer(config.model.tokenizer or self.loaded.tokenizer_path)
        if config.model.chat_template:
            self.tokenizer.chat_template = read_chat_template(config.model.chat_template)
        self.model_name = config.model.served_model_name or config.model.model or _default_name(self.loaded)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)

        cache, sched = config.cache, config.scheduler
        kv_dtype = jnp.dtype(KV_CACHE_DTYPES[cache.kv_cache_dtype] or _auto_kv_dtype(dtype, self.loaded))
        max_model_len = config.model.max_model_len or min(
            self.model_config.max_position_embeddings, 2048 if jax.default_backend() == "cpu" else 8192)
        # A quantized pool also keeps a float32 scale per token and K/V head (pallas_kernels.QuantizedPages).
        bytes_per_value = kv_dtype.itemsize + (4 / self.model_config.head_dim if kv_dtype.itemsize == 1 else 0)
        num_pages = cache.num_pages or self._pages_from_budget(max_model_len, bytes_per_value)
        pool_tokens = num_pages * cache.page_size
        if pool_tokens < max_model_len:
            logger.warning("KV pool holds %d tokens < max_model_len %d; lowering max_model_len", pool_tokens,
                           max_model_len)
            max_model_len = pool_tokens
        self.max_model_len = max_model_len
        if sched.max_num_batched_tokens < sched.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({sched.max_num_seqs}) so every running sequence can decode each step")
        self.runner = ModelRunner(self.loaded.model, self.model_config, num_pages=num_pages,
                                  page_size=cache.page_size, max_model_len=max_model_len,
                                  max_num_seqs=sched.max_num_seqs,
                                  max_num_batched_tokens=sched.max_num_batched_tokens, kv_dtype=kv_dtype,
                                  mesh=self.mesh, mirror=mirror)
        self.pool = PagePool(num_pages, cache.page_size, enable_prefix_caching=cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched, self.pool, max_logits_rows=self.runner.shapes.row_buckets[-1],
                                   max_model_len=max_model_len)
        self.processor = OutputProcessor(self.tokenizer, self.eos_token_ids, max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.load_seconds = time.perf_counter() - t0
        self.warmup_seconds = self.runner.warmup() if config.compile.warmup else 0.0
        per_device = self.runner.bytes_per_device()
        for d in self.mesh.devices.flat:
            logger.info("device %s: params %.1f MiB, KV pool %.1f MiB", d, per_device["params"].get(d, 0) / 2**20,
                        per_device["pool"].get(d, 0) / 2**20)
        logger.info("engine ready: %s, %d KV pages x %d tokens of %s (%.0f MiB; %.0f MiB with penalty state), "
                    "max_model_len %d, prefix caching %s, %d programs compiled in %.1fs (load %.1fs)",
                    self.model_name, num_pages, cache.page_size, kv_dtype.name, self.runner.kv_pages.nbytes / 2**20,
                    self.runner.device_bytes / 2**20, max_model_len,
                    "on" if cache.enable_prefix_caching else "off", len(self.runner.compiled),
                    self.warmup_seconds, self.load_seconds)

        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(config.model.seed)
        self._order = 0
        self._aborted_outputs: list[RequestOutput] = []
        self.healthy = True  # False only while a failed step's device state is being rebuilt
        self.num_step_failures = 0
        self._inflight: _Launched | None = None  # async scheduling: the step on the device
        self.timing = StepTiming()
        self.pacer = LaunchPacer()
        self.mask_seconds = 0.0  # host time spent filling structured-output token masks
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_iteration_tokens = 0

    def _pages_from_budget(self, max_model_len: int, itemsize: float) -> int:
        cache, sched = self.config.cache, self.config.scheduler
        page_bytes = self.model_config.kv_bytes_per_token(itemsize) * cache.page_size
        n = self.mesh.shape[sharding.MODEL]
        if sharding.kv_heads_sharded(self.model_config.num_kv_heads, n):
            page_bytes //= n  # the budget is per device, and each device holds 1/n of every page
        budget = cache.kv_cache_memory
        if budget is None:
            if jax.default_backend() == "cpu":
                budget = min(_CPU_KV_BUDGET, page_bytes * sched.max_num_seqs * -(-max_model_len // cache.page_size))
            else:
                stats = self.mesh.devices.flat[0].memory_stats() or {}
                free = stats.get("bytes_limit", 16 << 30) - stats.get("bytes_in_use", 0)
                budget = int(free * cache.gpu_memory_utilization)
        return max(1, int(budget // page_bytes))

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    pooling: str | bool | None = None) -> None:
        """`pooling`: make this an embedding request ("last" / "mean", True = the engine's --pooling):
        its prompt is prefilled like any other (batched with generation) and it returns the pooled,
        L2-normalized final hidden state instead of tokens."""
        if pooling is True:
            pooling = self.config.model.pooling
        if pooling not in (None, False, "last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if pooling:
            params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string or prompt_token_ids a list of token ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of the vocabulary (0..{vocab - 1})")
        n_prompt = len(prompt_token_ids)
        if params.max_tokens is None:
            max_tokens = self.max_model_len - n_prompt
            if max_tokens < 1:
                raise ValueError(f"prompt ({n_prompt} tokens) leaves no room in max_model_len ({self.max_model_len})")
        else:
            max_tokens = params.max_tokens
            if n_prompt + max_tokens > self.max_model_len:
                raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                                 f"exceeds max_model_len ({self.max_model_len})")
        if params.num_samples > self.config.scheduler.max_num_seqs:
            raise ValueError(f"n/best_of ({params.num_samples}) exceeds max_num_seqs "
                             f"({self.config.scheduler.max_num_seqs})")
        for p in list(params.stop_token_ids or []) + list((params.logit_bias or {}).keys()):
            if not 0 <= int(p) < vocab:
                raise ValueError(f"token id {p} in stop_token_ids/logit_bias is out of the vocabulary")
        self._order += 1
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError("cache_salt must be a string")
        grammar = self.grammars.grammar(params.structured_outputs) if params.structured_outputs else None
        req = Request(request_id, prompt, prompt_token_ids, params, max_tokens, priority,
                      arrival_time if arrival_time is not None else time.time(), self._order,
                      page_size=self.pool.page_size, cache_salt=(cache_salt or "").encode())
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        req.pooling = pooling or None
        req.sequences.append(self._new_sequence(req, 0, seed, list(prompt_token_ids)))
        if grammar is not None:
            req.sequences[0].matcher = self.grammars.matcher(grammar)
        self.requests[request_id] = req
        self.scheduler.add(req.sequences[0])

    def _new_sequence(self, req: Request, index: int, seed: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(req, index, token_ids, seed=seed)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                                 skip_special_tokens=req.params.skip_special_tokens)
        return seq

    def abort_request(self, request_ids) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.sequences:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)
            req.forked = True  # no siblings will be created any more
            req.metrics.finished_time = time.time()
            self._aborted_outputs.append(self.processor.make_output(req, True))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted_outputs) or self._inflight is not None

    @property
    def idle_after_async_step(self) -> bool:
        """Async scheduling, and the last step() left nothing on the device: it applied a step that
        carried a first output without dispatching another (see step), or the work ran out."""
        return self.config.scheduler.async_scheduling and self._inflight is None

    def reset_prefix_cache(self) -> int:
        """Forgets every cached page (POST /reset_prefix_cache); returns how many were named."""
        return self.pool.reset_prefix_cache()

    def get_stats(self) -> EngineStats:
        """O(running): waiting counts sequences not yet running (an n > 1 request's parent counts once)."""
        running = {s.request.request_id for s in self.scheduler.running}
        return EngineStats(len(running), self.scheduler.num_waiting, self.pool.usage,
                           self.scheduler.num_preemptions, self.prompt_tokens_total, self.generation_tokens_total,
                           self.last_iteration_tokens, len(self.runner.compiled), self.runner.num_recompiles,
                           self.warmup_seconds, self.pool.queries, self.pool.hits, self.healthy)

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> prepare -> dispatch to the device -> apply tokens -> outputs of requests that moved.

        With async scheduling the step dispatched here runs on the device while the host applies the
        previous step's tokens; its own tokens are applied (and its outputs returned) by the next call.
        A step that carries a request's first output is the exception: the next call applies it before
        building another (see `_Launched.first_output`).
        """
        outputs, self._aborted_outputs = self._aborted_outputs, []
        t0 = time.perf_counter()
        if self._inflight is not None and self._inflight.first_output:
            done, self._inflight = self._inflight, None
            return outputs + self._complete(done, t0, None)
        sched = self.scheduler.schedule()
        self.last_iteration_tokens = sched.total_tokens
        launched = None
        if sched:
            try:
                launched = self._launch(sched)
            except Exception as exc:  # noqa: BLE001 - a device fault: fail its requests, keep serving
                return outputs + self._recover(exc, [sched] + ([self._inflight.sched] if self._inflight else []))
            self.pacer.dispatched(launched.dispatched_at - t0)
        if self.config.scheduler.async_scheduling:
            done, self._inflight = self._inflight, launched
        else:
            done = launched
        if done is not None:
            outputs += self._complete(done, t0, self._inflight)
        return outputs

    def _complete(self, done: _Launched, t0: float, on_device: _Launched | None) -> list[RequestOutput]:
        """Waits for `done`'s results and applies them; `on_device` is a later step already dispatched."""
        t1 = time.perf_counter()
        try:
            result = self.runner.fetch(done.pending)
        except Exception as exc:  # noqa: BLE001 - a device fault: fail its requests, keep serving
            return self._recover(exc, [done.sched] + ([on_device.sched] if on_device else []))
        t2 = time.perf_counter()
        self.pacer.fetched(done.bucket, done.dispatched_at, t2 - t1, t2)
        outputs = self._process(done, result)
        self.timing.record(host=(t1 - t0) + (time.perf_counter() - t2), wait=t2 - t1)
        return outputs

    def launch_delay(self) -> float:
        """Async scheduling: seconds the next step() may wait for new requests before dispatching, so
        that they join the step that follows the one in flight (LaunchPacer); 0 when none is in flight
        or when the next step() only applies the one in flight (it carries a first output)."""
        inflight = self._inflight
        if inflight is None or inflight.first_output:
            return 0.0
        return self.pacer.delay(inflight.bucket, inflight.dispatched_at)

    def _launch(self, sched: SchedulerOutput) -> _Launched:
        now = time.time()
        for item in sched.scheduled:
            req = item.seq.request
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                self.prompt_tokens_total += req.num_prompt_tokens
        prev = self._inflight
        prev_rows = prev.own_rows if prev is not None else None
        inputs = self.runner.prepare(sched, prev_rows)
        rows, owners = self._logits_rows(sched, inputs.row_offsets)
        pending = self.runner.dispatch(inputs, rows, prev.pending if prev is not None else None)
        own_rows = {id(o[1]): i for i, o in enumerate(owners) if o[0] == "sample" and o[2] == o[1].index}
        first_output = (any(o[0] == "sample" and o[1].request.metrics.first_token_time is None for o in owners)
                        or any(it.seq.request.pooling is not None and it.start + it.num_tokens >= it.seq.num_tokens
                               for it in sched.scheduled))
        return _Launched(sched, owners, pending, [item.seq.epoch for item in sched.scheduled], own_rows,
                         len(inputs.forward.token_ids), time.perf_counter(), first_output)

    def _process(self, done: _Launched, result) -> list[RequestOutput]:
        """Applies a finished step: names the pages it filled, appends its tokens, builds outputs."""
        touched: dict[str, Request] = {}
        pooled = None if done.pending.pooled is None else np.asarray(done.pending.pooled)
        for k, (item, epoch) in enumerate(zip(done.sched.scheduled, done.epochs)):
            seq = item.seq
            if seq.epoch == epoch:  # still owns the pages this step wrote
                self.scheduler.register_computed_pages(seq, item.start + item.num_tokens)
                if seq.request.pooling is not None and not seq.is_finished:
                    self._pool(seq, item, pooled[k])
            touched[seq.request.request_id] = seq.request
        if result is not None:
            self._apply_samples(done.owners, result)
        outputs = []
        for req in touched.values():
            if req.request_id not in self.requests:
                continue
            finished = req.is_finished
            if finished:
                req.metrics.finished_time = time.time()
                del self.requests[req.request_id]
            out = self.processor.make_output(req, finished)
            if out is not None:
                outputs.append(out)
        return outputs

    def _pool(self, seq: Sequence, item, rows_sum: np.ndarray) -> None:
        """Adds a chunk's pooled hidden rows to an embedding request; finishes it after its last chunk."""
        req = seq.request
        if item.start == 0 or req.pooled is None:
            req.pooled = np.zeros_like(rows_sum, dtype=np.float64)  # (re)started from the first token
        req.pooled += rows_sum
        if item.start + item.num_tokens < seq.num_tokens:
            return
        vec = req.pooled / (req.num_prompt_tokens if req.pooling == "mean" else 1)
        norm = np.linalg.norm(vec)
        req.embedding = (vec / norm if norm > 0 else vec).astype(np.float32).tolist()
        seq.finish_reason = "stop"
        self.scheduler.finish(seq)

    def _recover(self, exc: Exception, failed_steps: list[SchedulerOutput]) -> list[RequestOutput]:
        """After a failed step the donated pool is gone: fail the requests of the steps on the device,
        rebuild the device state, and send every other sequence back to recompute from its tokens."""
        failed = {item.seq.request.request_id: item.seq.request for s in failed_steps for item in s.scheduled}
        logger.exception("engine step failed (%s); failing its %d requests and rebuilding the KV pool",
                         type(exc).__name__, len(failed))
        self.healthy = False
        self.num_step_failures += 1
        self._inflight = None
        outputs = []
        for rid, req in failed.items():
            if rid not in self.requests:
                continue
            for seq in req.sequences:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)
            req.forked = True
            req.metrics.finished_time = time.time()
            del self.requests[rid]
            outputs.append(self.processor.make_output(req, True, error=f"engine step failed: {exc}"))
        for req in self.requests.values():  # sampled tokens of the lost step will never arrive
            for seq in req.sequences:
                seq.num_inflight = 0
        self.scheduler.preempt_all()
        self.pool.reset()
        self.runner.reset_device_state()  # raises if the device is really gone: the caller must exit
        self.healthy = True
        return outputs

    def _logits_rows(self, sched: SchedulerOutput, offsets: list[int]):
        """Rows to compute logits for, with who owns each: ('sample', seq, sibling) or ('prompt', req, pos)."""
        rows: list[LogitsRow] = []
        owners: list[tuple] = []
        for item, start_row in zip(sched.scheduled, offsets):
            seq = item.seq
            req, p = seq.request, seq.request.params
            for pos in item.prompt_logprob_positions:
                # Logprob of prompt token pos+1 given tokens up to pos.
                rows.append(LogitsRow(start_row + pos - item.start, RowSpec(
                    target_id=req.prompt_token_ids[pos + 1], top_logprobs=bool(p.prompt_logprobs))))
                owners.append(("prompt", req, pos + 1))
            if not item.num_samples:
                continue  # a prefill chunk that does not reach the end samples nothing
            # n > 1: the prompt's last row samples every sibling's first token; siblings go first so
            # they can share the parent's pages before the parent may finish and free them.
            siblings = [*range(1, item.num_samples), 0] if item.num_samples > 1 else [seq.index]
            # Output tokens before this sample (an in-flight one included): the PRNG step and min_tokens.
            n_out = item.start + item.num_tokens - seq.num_prompt_tokens
            suppress = p.all_stop_token_ids(self.eos_token_ids) if n_out < p.min_tokens else ()
            mask = None
            if seq.matcher is not None:  # the grammar has seen every token before this sample
                t0 = time.perf_counter()
                mask = np.empty(mask_words(self.model_config.vocab_size), np.int32)
                fill_mask(seq.matcher, mask)
                self.mask_seconds += time.perf_counter() - t0
            for index in siblings:
                seed = seq.seed if index == seq.index else _sibling_seed(seq.seed, index)
                spec = RowSpec.from_params(p, seed=seed, step=n_out, suppress_ids=suppress)
                spec.token_mask = mask
                rows.append(LogitsRow(start_row + item.num_tokens - 1, spec, seat=seq.seat))
                owners.append(("sample", seq, index))
        return rows, owners

    def _apply_samples(self, owners, result) -> None:
        proc = self.processor
        for i, owner in enumerate(owners):
            args = (int(result.token_ids[i]), float(result.token_logprob[i]), int(result.token_rank[i]),
                    result.top_ids[i], result.top_logprobs[i])
            if owner[0] == "prompt":
                _, req, pos = owner
                target = req.prompt_token_ids[pos]
                req.prompt_logprobs.append(proc.logprob_entry(target, *args[1:], req.params.prompt_logprobs))
                continue
            _, seq, index = owner
            req = seq.request
            if seq.is_finished:
                continue  # stopped (or aborted) while this step was in flight: its sample is void
            if index == seq.index:
                seq.num_inflight -= 1
            target = self._fork(seq, index) if index != seq.index else seq
            self.generation_tokens_total += 1
            req.metrics.num_generation_tokens += 1
            now = time.time()
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            if proc.append_token(target, *args):
                self.scheduler.finish(target)
            if index == 0:
                req.forked = True

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """The first token of an n > 1 sibling: it shares the prompt's full pages with its parent."""
        req = parent.request
        seq = self._new_sequence(req, index, _sibling_seed(parent.seed, index), list(req.prompt_token_ids))
        if parent.matcher is not None:  # siblings fork before the parent consumes its own first token
            seq.matcher = parent.matcher.deep_copy()
        req.sequences.append(seq)
        if parent.seat is None:  # the parent was preempted while this step was in flight: start over
            self.scheduler.add(seq)
            return seq
        full_pages = req.num_prompt_tokens // self.pool.page_size
        seq.pages = self.pool.share(parent.pages[:full_pages])
        seq.page_hashes = parent.page_hashes[:full_pages]
        seq.num_registered_pages = min(full_pages, parent.num_registered_pages)
        # The partly filled last prompt page cannot be shared (the sibling writes its own tokens there):
        # those few prompt tokens are recomputed into a page of the sibling's own.
        seq.num_computed_tokens = seq.num_written_tokens = full_pages * self.pool.page_size
        self.scheduler.add_running(seq, parent)
        return seq


@dataclass
class _Launched:
    """A step on the device: what was scheduled, who owns each logits row, and its pending results."""

    sched: SchedulerOutput
    owners: list[tuple]
    pending: object  # runner.PendingStep
    epochs: list[int]  # each scheduled sequence's epoch when dispatched
    own_rows: dict[int, int]  # id(seq) -> row that samples the sequence's own next token
    bucket: int  # the step's padded token count (its forward program)
    dispatched_at: float  # time.perf_counter() when it went to the device
    # It samples some request's first token (or ends an embedding's prompt). Such a step is not
    # overlapped: it is applied before the next one is built, so that output waits neither for the next
    # step's host work and pacing (a dispatch held for a learned step time, which a step's context can
    # make ~2x off) nor, on a CPU, for cores the next step's computation has taken. Served on two cores,
    # cached chat turns' median TTFT went 47.2 / 45.6 -> 37.6 / 39.2 ms (README, fifteenth sitting); the
    # overlap is lost on one step per request.
    first_output: bool


class StepTiming:
    """Host time per step (scheduling, input building, applying tokens) and time spent waiting for
    the device, as running means over a window of steps."""

    def __init__(self, window: int = 256):
        self.window = window
        self.host: list[float] = []
        self.wait: list[float] = []

    def record(self, host: float, wait: float) -> None:
        self.host.append(host)
        self.wait.append(wait)
        if len(self.host) > 2 * self.window:
            del self.host[:-self.window], self.wait[:-self.window]

    def summary(self) -> dict[str, float]:
        h, w = self.host[-self.window:], self.wait[-self.window:]
        return {"host_ms_per_step": 1e3 * sum(h) / max(1, len(h)),
                "device_wait_ms_per_step": 1e3 * sum(w) / max(1, len(w))}


def read_chat_template(value: str) -> str:
    """--chat-template: a path to a template file, or the template text itself (vLLM accepts both)."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"chat_template: {value!r} is neither a file nor a Jinja template")
    return value


def _sibling_seed(seed: int, index: int) -> int:
    """Distinct, reproducible seeds for the n completions of one seeded request (index 0 keeps it)."""
    return seed if index == 0 else (seed * 1_000_003 + index * 7919) % (2**31)


def _default_name(loaded) -> str:
    return os.path.basename(loaded.path.rstrip("/")).removesuffix(".gguf")
