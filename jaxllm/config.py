"""One dataclass tree for every knob; CLI flags (offline and server) are derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    model: str | None = None  # HF dir, .gguf file, hub id; None = the embedded default (SmolLM2-135M)
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    served_model_name: str | None = None
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on accelerators), float32, bfloat16
    max_model_len: int | None = None  # defaults to min(model's context, 2048 on CPU / 8192 elsewhere)
    seed: int = 0
    revision: str | None = None
    attention_backend: str = "auto"  # auto | reference | tpu | gpu | cpu (force one ragged attention kernel)
    attention_interpret: bool = False  # run the Pallas kernel in interpret mode (debugging on CPU)
    chat_template: str | None = None  # a Jinja file or inline template replacing the checkpoint's own
    pooling: str = "last"  # embeddings: last | mean over the final hidden states, then L2-normalized
    # Weights kept quantized in the matmuls: gguf (a GGUF file's blocks as stored) | int8 | fp8
    # (per-channel, quantized at load); None = float weights (HF-exact)
    quantization: str | None = None


@dataclass
class CacheConfig:
    page_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV page pool; None = a backend default
    gpu_memory_utilization: float = 0.85  # accelerators: fraction of free device memory after weights
    num_pages: int | None = None  # explicit override (tests use a tiny pool)
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True  # reuse the K/V of full pages whose prefix was computed before


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    policy: str = "fcfs"  # fcfs | priority
    max_waiting_requests: int | None = None  # server back-pressure; None = unbounded
    # Prepare step N+1 on the host while the device runs step N (vLLM's --async-scheduling, on by
    # default since vLLM 0.14; --no-async-scheduling turns it off).
    async_scheduling: bool = True


@dataclass
class CompileConfig:
    persistent_cache: bool = True
    cache_dir: str | None = None  # defaults to ~/.cache/jaxllm/xla
    warmup: bool = True  # compile every bucket at start-up
    # Keep converted (stacked, dequantized) parameters next to the compilation cache, memory-mapped on
    # the next start of the same unchanged checkpoint (models/loading/param_cache.py).
    param_cache: bool = True


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1  # Megatron-style over the mesh's "model" axis (-tp)
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE experts split over the "model" axis instead of their width
    # Many hosts (vLLM's names): nnodes processes, one per host, form one mesh over all their devices
    # (jax.distributed, coordinator on master_addr:master_port, step channel on master_port + 1); rank 0
    # runs the engine, the others follow it (jaxllm/engine/multihost.py).
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29501
    node_timeout: float = 30.0  # seconds without a heartbeat before rank 0 declares a node lost

    @property
    def follows_rank0(self) -> bool:
        """A rank > 0 of many hosts: it runs rank 0's steps on its shards instead of an engine."""
        return self.nnodes > 1 and self.node_rank != 0


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_flags(cls, **flags: Any) -> "EngineConfig":
        """Builds the tree from flat keyword flags (vLLM's names: max_num_seqs=..., kv_cache_memory=...)."""
        config = cls()
        sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        for key, value in flags.items():
            for section in sections.values():
                if key in {f.name for f in dataclasses.fields(section)}:
                    setattr(section, key, value)
                    break
            else:
                raise TypeError(f"unknown engine flag {key!r}")
        return config

    def to_flags(self) -> dict[str, Any]:
        return {k: v for section in dataclasses.fields(self)
                for k, v in dataclasses.asdict(getattr(self, section.name)).items()}


@dataclass
class BatchConfig:
    """`python -m jaxllm.run_batch`: what a batch job adds to the engine's flags."""

    input_file: str = ""  # -i: local path or fsspec URL (gs://...), a glob of shards allowed
    output_file: str = ""  # -o: local path or fsspec URL
    work_dir: str | None = None  # committed parts + progress record; default OUTPUT + ".jaxllm-job"
    # A part is committed when this many records are finished or this many seconds passed since the last
    # commit, whichever comes first: the redo bound after a kill (plus what the engine holds in flight).
    commit_records: int = 1000
    commit_seconds: float = 30.0
    progress: bool = True  # tqdm bar on stderr


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxllm")


_FLAG_HELP = {
    "model": "HF model dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)",
    "kv_cache_memory": "bytes for the KV page pool (accepts 512MiB, 2GiB, ...)",
    "max_num_batched_tokens": "token budget of one engine step",
    "quantization": "weights kept quantized in the matmuls: gguf (a GGUF file's quantized tensors as "
                    "stored: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K), int8 or fp8 (per output channel)",
    "kv_cache_dtype": ("KV page pool dtype: auto (the model dtype; bfloat16 for -q gguf weights on AMX "
                       "tiles), float32, bfloat16, int8, fp8 (= fp8_e4m3)"),
    "nnodes": "number of hosts (processes) forming one mesh; start one process per host",
    "node_rank": "this host's rank: 0 runs the engine / server, the others follow it",
    "master_addr": "rank 0's address (jax.distributed coordinator)",
    "master_port": "coordinator port on rank 0; the step channel uses master_port + 1",
    "node_timeout": "seconds without a heartbeat before rank 0 declares a node lost and exits",
    "chat_template": "chat template (a .jinja file or the template itself) used instead of the checkpoint's; "
                     "e.g. configs/chat_templates/gemma.jinja for Gemma GGUFs that ship none",
}


_SHORT_FLAGS = {"tensor_parallel_size": "-tp", "data_parallel_size": "-dp", "quantization": "-q"}  # vLLM's


def parse_bytes(text: str | int | None) -> int | None:
    if text is None or isinstance(text, int):
        return text
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6,
             "gb": 1e9, "b": 1}
    s = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(float(s))


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds one --flag-name per field of the tree (vLLM spelling: dashes)."""
    defaults = EngineConfig()
    for section in dataclasses.fields(defaults):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            if f.name == "model":
                continue  # positional in the CLIs, also accepted as --model
            flag = "--" + f.name.replace("_", "-")
            default = getattr(getattr(defaults, section.name), f.name)
            if isinstance(default, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            else:
                kind = parse_bytes if f.name == "kv_cache_memory" else (
                    type(default) if default is not None else (int if "max" in f.name or "num" in f.name
                                                               else str))
                short = _SHORT_FLAGS.get(f.name)
                parser.add_argument(flag, *([short] if short else []), type=kind, default=default,
                                    help=_FLAG_HELP.get(f.name))
    parser.add_argument("--model", dest="model_flag", default=None, help=_FLAG_HELP["model"])
    return parser


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, short: dict[str, str] | None = None,
                       help: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """One --flag-name per field of a flat config dataclass (booleans get --no-...)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        names = [short[f.name], flag] if short and f.name in short else [flag]
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(*names, dest=f.name, type=kind, default=default, required=default == "",
                                help=(help or {}).get(f.name))
    return parser


def config_from_args(args: argparse.Namespace, model: str | None = None) -> EngineConfig:
    flags = {}
    defaults = EngineConfig()
    for section in dataclasses.fields(defaults):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            if f.name != "model" and hasattr(args, f.name):
                flags[f.name] = getattr(args, f.name)
    flags["model"] = model or getattr(args, "model_flag", None)
    return EngineConfig.from_flags(**flags)
