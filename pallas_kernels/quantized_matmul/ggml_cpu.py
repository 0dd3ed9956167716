"""The CPU path of quantized matmuls: ggml's kernels (llama.cpp's) through an XLA FFI custom call.

XLA:CPU cannot fuse a dequantization into a dot: it writes a float copy of the weight every step, which
makes a 4-bit weight slower than a float one (see __init__.py for the figures). ggml's kernels read the
packed blocks directly (the activations are quantized to 8 bits per block, as llama.cpp does), so a
decode step reads ~1/6 of the bytes. The extension is built once by build.py; without it, every
quantized matmul takes the reference path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

TARGET = "jaxllm_ggml_mul_mat"
ATTENTION_TARGET = "jaxllm_cpu_paged_attention"
WRITE_KV_TARGET = "jaxllm_cpu_write_kv"
ROW_ARGMAX_TARGET = "jaxllm_cpu_row_argmax"  # the sampler's (pallas_kernels/sampling)
ROW_LOGPROBS_TARGET = "jaxllm_cpu_row_logprobs"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The extension, loaded and its custom calls registered; None if absent or JAXLLM_GGML=0."""
    if os.environ.get("JAXLLM_GGML", "1") == "0":
        return None
    from pallas_kernels.quantized_matmul import build
    path = os.environ.get("JAXLLM_GGML_LIB") or str(build.library_path())
    if not os.path.exists(path):
        logger.info("ggml extension not built (%s); quantized matmuls dequantize in XLA. "
                    "Build it with: python -m pallas_kernels.quantized_matmul.build", path)
        return None
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxllmGgmlMulMat), platform="cpu")
    # The same library holds the CPU paged attention (ragged_paged_attention/cpu.py), on the same pool.
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.JaxllmCpuPagedAttention), platform="cpu")
    jax.ffi.register_ffi_target(WRITE_KV_TARGET, jax.ffi.pycapsule(lib.JaxllmCpuWriteKv), platform="cpu")
    jax.ffi.register_ffi_target(ROW_ARGMAX_TARGET, jax.ffi.pycapsule(lib.JaxllmCpuRowArgmax), platform="cpu")
    jax.ffi.register_ffi_target(ROW_LOGPROBS_TARGET, jax.ffi.pycapsule(lib.JaxllmCpuRowLogprobs), platform="cpu")
    lib.jaxllm_ggml_bind_workers.argtypes = [ctypes.c_int]
    lib.jaxllm_ggml_bind_workers(threads_bind() == "auto")
    lib.jaxllm_amx_row_bytes.restype = ctypes.c_int64
    lib.jaxllm_amx_row_bytes.argtypes = [ctypes.c_int64] * 3
    lib.jaxllm_amx_pack.restype = ctypes.c_int
    lib.jaxllm_amx_pack.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    lib.jaxllm_amx_bf16_takes.restype = ctypes.c_int
    lib.jaxllm_amx_bf16_takes.argtypes = [ctypes.c_int64]
    lib.jaxllm_amx_int8_takes.restype = ctypes.c_int
    lib.jaxllm_amx_int8_takes.argtypes = [ctypes.c_int64]
    lib.jaxllm_amx_int8_mul_mat.restype = ctypes.c_int
    lib.jaxllm_amx_int8_mul_mat.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return lib


def available() -> bool:
    """Whether the extension is built and its custom calls registered (False with JAXLLM_GGML=0)."""
    return _library() is not None


def amx_row_bytes(ggml_type: int, rows: int, in_features: int) -> int:
    """Bytes per row of a [rows, in_features] weight in ggml's AMX tile layout; 0 where the AMX kernels
    cannot take it (no AMX on this CPU or in the build, JAXLLM_AMX=0, another type, or shapes off the
    16 x 32 tiles)."""
    lib = _library()
    if lib is None or os.environ.get("JAXLLM_AMX", "1") == "0":
        return 0
    return int(lib.jaxllm_amx_row_bytes(ggml_type, rows, in_features))


def amx_bf16_takes(ggml_type: int) -> bool:
    """Whether large steps multiply AMX-layout weights of this type as one bf16 tile GEMM (amx_bf16.cc:
    Q4_0, Q4_1, Q8_0 on CPUs with AMX-BF16 and AVX512-BF16) rather than through ggml's int8 kernels."""
    lib = _library()
    return lib is not None and bool(lib.jaxllm_amx_bf16_takes(ggml_type))


def amx_int8_takes(ggml_type: int) -> bool:
    """Whether small steps (int8_min_rows up to bf16_min_rows) multiply AMX-layout weights of this type by
    amx_int8.cc's tile kernel (Q4_1 on CPUs with AMX) rather than ggml's."""
    lib = _library()
    return lib is not None and bool(lib.jaxllm_amx_int8_takes(ggml_type))


def amx_int8_mul_mat(ggml_type: int, x: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """x [m, k] f32 @ W^T by amx_int8.cc's kernel alone, on this thread; packed: W [n, amx_row_bytes] in
    the AMX tile layout. For tests: the custom call reaches the kernel inside ggml's graph."""
    x = np.ascontiguousarray(x, np.float32)
    packed = np.ascontiguousarray(packed, np.uint8)
    y = np.empty((x.shape[0], packed.shape[0]), np.float32)
    if _library().jaxllm_amx_int8_mul_mat(ggml_type, x.ctypes.data, x.shape[0], x.shape[1], packed.ctypes.data,
                                          packed.shape[0], y.ctypes.data):
        raise ValueError(f"amx_int8.cc does not take ggml type {ggml_type} [{packed.shape[0]}, {x.shape[1]}] here")
    return y


def amx_pack(ggml_type: int, data: np.ndarray, in_features: int) -> np.ndarray:
    """[..., rows, row_bytes] uint8 ggml rows -> [..., rows, amx_row_bytes] in the AMX tile layout."""
    rows = data.shape[-2]
    width = amx_row_bytes(ggml_type, rows, in_features)
    if width == 0:
        raise ValueError(f"ggml type {ggml_type} [{rows}, {in_features}] has no AMX layout here")
    src = np.ascontiguousarray(data, np.uint8).reshape(-1, rows, data.shape[-1])
    out = np.empty((src.shape[0], rows, width), np.uint8)
    for i in range(src.shape[0]):
        if _library().jaxllm_amx_pack(ggml_type, rows, in_features, src[i].ctypes.data, out[i].ctypes.data):
            raise RuntimeError(f"ggml could not repack a [{rows}, {in_features}] weight of type {ggml_type}")
    return out.reshape(data.shape[:-1] + (width,))


def num_threads() -> int:
    return int(os.environ.get("JAXLLM_GGML_THREADS") or len(os.sched_getaffinity(0)))


def leave_cores_to_ggml() -> bool:
    """Sizes XLA's CPU intra-op thread pool to one thread (PJRT_NPROC=1), for a process where ggml's pool
    runs every matmul and the attention; returns whether it did. XLA's other threads then only split small
    elementwise ops (norms, residual adds, SiLU) between cores, and waking one, its core held by ggml's
    polling worker, costs more than the split saves: a 67-row step's XLA ops took 23-26 ms with the
    default pool and 15 ms with one thread. Left alone when the user set PJRT_NPROC, when the extension
    is absent, or once JAX's backends have started (their pool is sized then). The variable is set only
    while the backends start, so processes started later (multi-device workers) keep the default."""
    if "PJRT_NPROC" in os.environ or not available():
        return False
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["PJRT_NPROC"] = "1"
    try:
        jax.devices("cpu")  # the CPU client reads it as it starts
    except RuntimeError:  # no CPU platform (JAX_PLATFORMS without cpu): nothing here runs on ggml
        return False
    finally:
        del os.environ["PJRT_NPROC"]
    return True


def threads_bind() -> str:
    """JAXLLM_GGML_THREADS_BIND (as vLLM's VLLM_CPU_OMP_THREADS_BIND): "auto" binds each worker of ggml's
    pool to one CPU of the process's set, from the last one down (the thread that calls ggml, XLA's,
    stays free); "nobind" leaves placement to the OS, e.g. for several engine processes sharing CPUs."""
    value = os.environ.get("JAXLLM_GGML_THREADS_BIND", "auto")
    if value not in ("auto", "nobind"):
        raise ValueError(f"JAXLLM_GGML_THREADS_BIND={value!r}: expected 'auto' or 'nobind'")
    return value


def poll() -> int:
    """How hard ggml's idle workers spin for the next call (0-100)."""
    return int(os.environ.get("JAXLLM_GGML_POLL", "50"))


def mul_mats(x: jax.Array, weights: list[tuple[int, jax.Array]], layer: jax.Array | None,
             amx: list[bool] | None = None, bf16_min_rows: int = 0, int8_min_rows: int = 0,
             live_rows: jax.Array | None = None, glu: bool = False) -> list[jax.Array]:
    """x [T, in] f32 @ W_i^T -> [T, out_i] f32 for each (ggml type, W_i [out_i, row_bytes]) in one call
    (one ggml graph: the thread pool wakes once). W_i may be [L, out_i, row_bytes] with `layer` picking
    one: the stack is passed whole, so a layer scan never copies a slice of it out. amx[i]: W_i is in
    the AMX tile layout (amx_pack). bf16_min_rows: steps of at least this many live rows multiply Q4_0 / Q4_1
    / Q8_0 weights in the AMX layout as one bf16 tile GEMM (amx_bf16.cc, where built), x and the weight
    rounded to bfloat16; 0 keeps ggml's int8 kernels at every size. int8_min_rows: steps of at least
    this many live rows (and fewer than bf16_min_rows) multiply Q4_1 weights in the AMX layout by
    amx_int8.cc's tile kernel (the same numbers as ggml's); 0: never. live_rows (a traced scalar): rows of
    x past it are padding, not multiplied, and their outputs are zeros. glu: weights are a gated MLP's
    (gate, up); the one result is silu(x @ gate^T) * (x @ up^T), taken in the same ggml graph."""
    if any(data.ndim == 3 for _, data in weights) and layer is None:
        raise ValueError("a stacked weight needs the layer index")
    if glu and (len(weights) != 2 or weights[0][1].shape[-2] != weights[1][1].shape[-2]):
        raise ValueError("glu takes two weights (gate, up) of the same number of outputs")
    index = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
    if live_rows is not None:
        index = jnp.concatenate([index, jnp.asarray(live_rows, jnp.int32).reshape(1)])
    outs = [jax.ShapeDtypeStruct((x.shape[0], data.shape[-2]), jnp.float32) for _, data in weights[:1 if glu else None]]
    return jax.ffi.ffi_call(TARGET, outs, has_side_effect=False)(
        x.astype(jnp.float32), index, *[data for _, data in weights],
        ggml_types=np.array([t for t, _ in weights], np.int64),
        amx=np.array(amx if amx is not None else [False] * len(weights), np.int64),
        bf16_min_rows=np.int64(bf16_min_rows), int8_min_rows=np.int64(int8_min_rows), glu=np.int64(glu),
        n_threads=np.int64(num_threads()), poll=np.int64(poll()))
