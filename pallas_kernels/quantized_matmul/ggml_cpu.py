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


@functools.cache
def available() -> bool:
    """Whether the extension is built and its custom calls registered (False with JAXLLM_GGML=0)."""
    if os.environ.get("JAXLLM_GGML", "1") == "0":
        return False
    from pallas_kernels.quantized_matmul import build
    path = os.environ.get("JAXLLM_GGML_LIB") or str(build.library_path())
    if not os.path.exists(path):
        logger.info("ggml extension not built (%s); quantized matmuls dequantize in XLA. "
                    "Build it with: python -m pallas_kernels.quantized_matmul.build", path)
        return False
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxllmGgmlMulMat), platform="cpu")
    # The same library holds the CPU paged attention (ragged_paged_attention/cpu.py), on the same pool.
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.JaxllmCpuPagedAttention), platform="cpu")
    return True


def num_threads() -> int:
    return int(os.environ.get("JAXLLM_GGML_THREADS") or len(os.sched_getaffinity(0)))


def poll() -> int:
    """How hard ggml's idle workers spin for the next call (0-100)."""
    return int(os.environ.get("JAXLLM_GGML_POLL", "50"))


def mul_mats(x: jax.Array, weights: list[tuple[int, jax.Array]], layer: jax.Array | None) -> list[jax.Array]:
    """x [T, in] f32 @ W_i^T -> [T, out_i] f32 for each (ggml type, W_i [out_i, row_bytes]) in one call
    (one ggml graph: the thread pool wakes once). W_i may be [L, out_i, row_bytes] with `layer` picking
    one: the stack is passed whole, so a layer scan never copies a slice of it out."""
    if any(data.ndim == 3 for _, data in weights) and layer is None:
        raise ValueError("a stacked weight needs the layer index")
    index = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(())
    outs = [jax.ShapeDtypeStruct((x.shape[0], data.shape[-2]), jnp.float32) for _, data in weights]
    return jax.ffi.ffi_call(TARGET, outs, has_side_effect=False)(
        x.astype(jnp.float32), index, *[data for _, data in weights],
        ggml_types=np.array([t for t, _ in weights], np.int64), n_threads=np.int64(num_threads()),
        poll=np.int64(poll()))
