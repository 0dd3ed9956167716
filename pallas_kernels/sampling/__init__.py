"""The sampler's reductions over the whole vocabulary (jaxllm/engine/sampler.py), with their CPU kernels.

  argmax_rows(x [R, V] f32) -> [R] i32: the first index of each row's max (rows without NaN)
  logprob_stats(logits [R, V] f32, wanted [R] i32) -> (lse [R] f32, rank [R] i32): log-sum-exp of each
      row, and 1 + the number of logits above the wanted token's

On one CPU device with the ggml extension built, each is one custom call (cpu_ffi.cc), a pass over each
row; elsewhere the jnp definitions below, which are also the reference. Why: XLA:CPU runs the jnp forms as
~6 passes over R x V with materialized broadcasts (the argmax's row max broadcast back over the
vocabulary, the where over an iota, a copy of the logits for each cond): ~4.5 ms per step for 16 rows of
SmolLM2's 49,152-word vocabulary on the 2-core dev VM, a sixth of a decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import ggml_cpu


def argmax_rows_reference(x: jax.Array) -> jax.Array:
    """jnp.argmax's result (no NaNs) as two plain reductions, which XLA:CPU runs ~3x faster than its
    variadic argmax reduce."""
    V = x.shape[-1]
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def logprob_stats_reference(logits: jax.Array, wanted: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = x_max + jnp.log(jnp.sum(jnp.exp(logits - x_max), axis=-1, keepdims=True))
    wanted_logit = jnp.take_along_axis(logits, wanted[:, None], axis=-1)
    rank = 1 + jnp.sum(logits > wanted_logit, axis=-1).astype(jnp.int32)
    return lse[:, 0], rank


def _on_cpu_kernel(x: jax.Array) -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    split = not mesh.empty and mesh.size > 1  # a custom call is one device's program
    return (jax.default_backend() == "cpu" and not split and x.dtype == jnp.float32 and x.ndim == 2
            and x.shape[1] > 0 and ggml_cpu.available())


def _attrs() -> dict:
    return dict(n_threads=np.int64(ggml_cpu.num_threads()), poll=np.int64(ggml_cpu.poll()))


def argmax_rows(x: jax.Array) -> jax.Array:
    if not _on_cpu_kernel(x):
        return argmax_rows_reference(x)
    out = jax.ShapeDtypeStruct((x.shape[0],), jnp.int32)
    return jax.ffi.ffi_call(ggml_cpu.ROW_ARGMAX_TARGET, out, has_side_effect=False)(x, **_attrs())


def logprob_stats(logits: jax.Array, wanted: jax.Array) -> tuple[jax.Array, jax.Array]:
    if not _on_cpu_kernel(logits):
        return logprob_stats_reference(logits, wanted)
    R = logits.shape[0]
    outs = (jax.ShapeDtypeStruct((R,), jnp.float32), jax.ShapeDtypeStruct((R,), jnp.int32))
    return jax.ffi.ffi_call(ggml_cpu.ROW_LOGPROBS_TARGET, outs, has_side_effect=False)(
        logits, jnp.asarray(wanted, jnp.int32), **_attrs())


__all__ = ["argmax_rows", "logprob_stats", "argmax_rows_reference", "logprob_stats_reference"]
