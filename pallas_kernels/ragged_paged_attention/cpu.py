"""Ragged paged attention on CPU: reference.py's contract as one XLA custom call per layer (cpu_ffi.cc).

XLA:CPU runs the jnp reference as a loop of page gathers, transposes and small dots, which costs ~90 us
per layer per 128 keys even for a single decode row. The custom call walks each row's own pages in
place (a (row, KV head) per task, on ggml's thread pool for large steps), and takes every step shape,
prefill included, so a row's result never depends on the bucket its step fell in.

Used by backend="auto" on CPU for a float32 pool with no k_scale / v_scale when the extension is built
(`python -m pallas_kernels.quantized_matmul.build`; `JAXLLM_GGML=0` turns it off); otherwise the
reference runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import ggml_cpu


def usable(q: jax.Array, kv_pages, k_scale=None, v_scale=None) -> bool:
    """Whether this call can take the custom call: CPU, extension built, float32 q and pool."""
    return (jax.default_backend() == "cpu" and k_scale is None and v_scale is None
            and isinstance(kv_pages, jax.Array) and kv_pages.dtype == jnp.float32
            and q.dtype == jnp.float32 and ggml_cpu.available())


def ragged_paged_attention(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array, page_table: jax.Array,
                           cu_q_lens: jax.Array, num_seqs: jax.Array, *, sm_scale: float,
                           sliding_window=None, soft_cap: float | None = None, layer=None) -> jax.Array:
    """q [T, Hq, D] f32 over kv_pages [(L,) P, S, 2 * Hkv, D] f32 -> [T, Hq, D]; see reference.py.
    sliding_window may be traced (a per-layer value inside a scan)."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    window = i32(-1 if sliding_window is None else sliding_window).reshape(())
    index = i32(0 if layer is None else layer).reshape(())
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(ggml_cpu.ATTENTION_TARGET, out, has_side_effect=False)(
        q, kv_pages, index, i32(kv_lens), i32(page_table), i32(cu_q_lens), i32(num_seqs).reshape(1), window,
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        n_threads=np.int64(ggml_cpu.num_threads()), poll=np.int64(ggml_cpu.poll()))
