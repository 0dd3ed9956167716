"""Ragged paged attention: one entry point, dispatched by backend.

  backend="auto" (default): TPU -> the Mosaic kernel (tpu.py); NVIDIA GPU -> the Pallas-Triton kernel
                            (gpu.py), each once listed in HARDWARE_VERIFIED; CPU -> the custom call
                            of cpu.py for float32, bfloat16 and per-token int8 pools when the ggml
                            extension is built; anything else (ROCm, unverified kernels, float8 pools on CPU) -> the
                            pure-jnp reference.
  backend="reference" | "tpu" | "gpu" | "cpu": force one implementation (debugging, tests).
  interpret=True: run the chosen Pallas kernel in interpret mode (TPU interpret mode for "tpu", the
                  generic Pallas interpreter for "gpu"); with backend="auto" on a CPU host this
                  selects the TPU kernel, so a CPU run still exercises a real kernel end to end.
Extra keyword arguments (`**tuning`) go to the kernel (block sizes, splits; see tpu.py / gpu.py).

All implementations share reference.py's contract and pool layout. write_kv (an XLA scatter into the
donated pool, in place; for bfloat16 pools on CPU, cpu.py's custom call, as XLA:CPU converts the whole
pool around a bfloat16 scatter) serves every backend and runs before attention. It is not fused into the
kernels: on a GPU, programs of one launch run in no set order, so a program could read keys of its
sequence that another program has not yet written; on a TPU a fused write (tiles run in order on a
core) is possible but unmeasured, and the scatter moves only the new tokens' K/V.
"""

from __future__ import annotations

import jax

from pallas_kernels.ragged_paged_attention import cpu as _cpu
from pallas_kernels.ragged_paged_attention import gpu as _gpu
from pallas_kernels.ragged_paged_attention import tpu as _tpu
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention as reference_attention
from pallas_kernels.ragged_paged_attention.reference import QuantizedPages, allocate_pages
from pallas_kernels.ragged_paged_attention.reference import write_kv as reference_write_kv

BACKENDS = ("auto", "reference", "tpu", "gpu", "cpu")
# Kernels that have passed tests/test_attention_kernels.py compiled on real hardware; "auto" only
# picks these (force the others with backend="tpu" / "gpu").
HARDWARE_VERIFIED: frozenset[str] = frozenset()


def _is_nvidia(device) -> bool:
    if device.platform not in ("gpu", "cuda"):
        return False
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    return "rocm" not in version and "hip" not in version


def native_kernel() -> str | None:
    """The kernel written for this host's accelerator: "tpu", "gpu" (NVIDIA), or None (CPU, ROCm)."""
    device = jax.devices()[0]
    return "tpu" if device.platform == "tpu" else "gpu" if _is_nvidia(device) else None


def resolve_backend(backend: str = "auto", interpret: bool = False) -> str:
    """The implementation `backend` stands for on this host: "reference", "tpu" or "gpu"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    kernel = native_kernel()
    if kernel is None:
        return "tpu" if interpret else "reference"
    if not interpret and kernel not in HARDWARE_VERIFIED:
        # A kernel that has only run interpreted could fail to lower on the device and take the
        # engine down at start-up; until it has passed its tests there, "auto" stays exact and safe.
        return "reference"
    return kernel


def write_kv(kv_pages, k, v, slot_mapping, *, layer=None, k_scale=None, v_scale=None):
    """reference.write_kv's contract; bfloat16 pools on CPU through cpu.py's in-place custom call."""
    if k_scale is None and v_scale is None and _cpu.writes_kv(kv_pages):
        return _cpu.write_kv(kv_pages, k, v, slot_mapping, layer=layer)
    return reference_write_kv(kv_pages, k, v, slot_mapping, layer=layer, k_scale=k_scale, v_scale=v_scale)


def ragged_paged_attention(q, kv_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale=None, v_scale=None, layer=None, backend: str = "auto",
                           interpret: bool = False, **tuning):
    """[T, Hq, D] attention of each ragged row over its sequence's pages; see reference.py."""
    impl = resolve_backend(backend, interpret)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  k_scale=k_scale, v_scale=v_scale, layer=layer)
    args = (q, kv_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    if isinstance(kv_pages, QuantizedPages) and impl not in ("reference", "cpu"):
        raise NotImplementedError(f"the {impl} kernel takes per-page or per-head KV scales, not the engine's "
                                  "per-token ones: use attention_backend='reference' (or 'cpu') with a quantized KV cache")
    if impl == "cpu" or (impl == "reference" and backend == "auto" and _cpu.usable(q, kv_pages, k_scale, v_scale)):
        if not _cpu.usable(q, kv_pages, k_scale, v_scale, float8=True):
            raise NotImplementedError("the cpu kernel needs the ggml extension built, a CPU backend and a "
                                      "float32 / bfloat16 pool without k_scale / v_scale, or QuantizedPages, and a "
                                      "float32 q whose head_dim is a multiple of 16")
        return _cpu.ragged_paged_attention(*args, sm_scale=sm_scale, sliding_window=sliding_window,
                                           soft_cap=soft_cap, layer=layer)
    if impl == "reference":
        return reference_attention(*args, **kwargs)
    fn = _tpu.ragged_paged_attention if impl == "tpu" else _gpu.ragged_paged_attention
    return fn(*args, interpret=interpret, **kwargs, **tuning)


__all__ = ["ragged_paged_attention", "reference_attention", "write_kv", "QuantizedPages", "allocate_pages",
           "resolve_backend", "native_kernel", "BACKENDS"]
