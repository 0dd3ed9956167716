"""DataParallelEngine: M engine replicas behind one LLMEngine-shaped front (--data-parallel-size M).

The mesh is ("data", "model") = (M, TP); replica r runs on row r as its own (1, TP) mesh, with its own
copy of the (tensor-parallel) parameters, page pool, scheduler and penalty state. A new request goes to
the replica with the least running + waiting requests (vLLM's balancing); a request never moves.
Replicas step in turn on the one engine thread; each step only enqueues device work until its outputs
are fetched, so with --async-scheduling replicas' device work overlaps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from flax import nnx

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import EngineStats, LLMEngine, load_for
from jaxllm.outputs import RequestOutput
from models import sharding
from pallas_kernels.quantized_matmul import ggml_cpu

logger = logging.getLogger(__name__)


class DataParallelEngine:
    def __init__(self, config: EngineConfig | None = None, **flags):
        self.config = config = config or EngineConfig.from_flags(**flags)
        par = config.parallel
        mesh = sharding.make_mesh(par.tensor_parallel_size, par.data_parallel_size)
        replica_config = copy.deepcopy(config)
        replica_config.parallel.data_parallel_size = 1
        rows = [sharding.make_mesh(par.tensor_parallel_size, 1, devices=mesh.devices[r])
                for r in range(par.data_parallel_size)]
        loaded = load_for(replica_config, rows[0])  # converted once, into replica 0's shards
        self.replicas: list[LLMEngine] = []
        for r, row in enumerate(rows):
            # The others copy replica 0's shards device to device.
            own = dataclasses.replace(loaded, model=nnx.clone(loaded.model)) if r else loaded
            self.replicas.append(LLMEngine(replica_config, mesh=row, loaded=own))
        self._owner: dict[str, int] = {}

    def __getattr__(self, name):
        # Read-only facts every replica shares (tokenizer, model_name, max_model_len, model_config, ...).
        if name == "replicas":
            raise AttributeError(name)
        return getattr(self.replicas[0], name)

    @property
    def healthy(self) -> bool:
        return all(r.healthy for r in self.replicas)

    def _load(self, engine: LLMEngine) -> int:
        return len(engine.scheduler.running) + engine.scheduler.num_waiting

    def add_request(self, request_id: str, *args, **kwargs) -> None:
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        r = min(range(len(self.replicas)), key=lambda i: (self._load(self.replicas[i]), i))
        self.replicas[r].add_request(request_id, *args, **kwargs)
        self._owner[request_id] = r

    def abort_request(self, request_ids) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            r = self._owner.get(rid)
            if r is not None:
                self.replicas[r].abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def launch_delay(self) -> float:
        """The shortest of the busy replicas' delays (LLMEngine.launch_delay): step() steps them all, so
        none may go out later than its own step in flight allows."""
        return min((e.launch_delay() for e in self.replicas if e.has_unfinished_requests()), default=0.0)

    def reset_prefix_cache(self) -> int:
        return sum(e.reset_prefix_cache() for e in self.replicas)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for e in self.replicas:
            if e.has_unfinished_requests():
                outputs.extend(e.step())
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def get_stats(self) -> EngineStats:
        """Totals (what a single engine reports) with each replica's own stats in `replicas`."""
        each = [e.get_stats() for e in self.replicas]
        total = EngineStats(**{f.name: getattr(each[0], f.name) for f in dataclasses.fields(EngineStats)})
        for f in dataclasses.fields(EngineStats):
            values = [getattr(s, f.name) for s in each]
            if f.name == "kv_cache_usage":
                total.kv_cache_usage = sum(values) / len(values)
            elif f.name == "healthy":
                total.healthy = all(values)
            elif f.name == "warmup_seconds":
                total.warmup_seconds = max(values)
            elif f.name != "replicas":
                setattr(total, f.name, sum(values))
        total.replicas = each
        return total


def size_cpu_threads(config: EngineConfig) -> None:
    """Before a process's first engine: -q gguf and -q int8 on one device leave the cores to ggml
    (ggml_cpu.leave_cores_to_ggml); on CPU both put the projections on ggml's kernels. Several devices'
    programs and their collectives share XLA's pool, so it keeps its size for them."""
    par = config.parallel
    one_device = par.tensor_parallel_size == par.data_parallel_size == par.nnodes == 1
    if config.model.quantization in ("gguf", "int8") and one_device and ggml_cpu.leave_cores_to_ggml():
        logger.info("XLA's CPU thread pool sized to one thread (PJRT_NPROC=1): ggml's pool runs the matmuls")


def create_engine(config: EngineConfig):
    """LLMEngine, DataParallelEngine when data_parallel_size > 1, or rank 0's LeaderEngine when nnodes > 1."""
    size_cpu_threads(config)
    if config.parallel.nnodes > 1:
        from jaxllm.engine.multihost import LeaderEngine
        return LeaderEngine(config)
    if config.parallel.data_parallel_size > 1:
        return DataParallelEngine(config)
    return LLMEngine(config)
