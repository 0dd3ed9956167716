"""Building blocks of Llama-like decoders: RMSNorm, rotary embedding, gated MLP, paged attention.

Modules are built from arrays (loaded or random) rather than initializers: every weight comes from a
checkpoint, and a model's layers are one module whose arrays carry a leading layer axis (the model
scans over it, see llama.py). Linear weights are stored [in, out] so a layer is `x @ w`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from models.base import AttentionMetadata
from models.config import TransformerConfig


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out]. float32 weights get full-precision matmuls: GPUs/TPUs otherwise
    round f32 operands to TF32/bf16, and f32 mode exists for exact parity with HF references."""
    precision = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    return jnp.matmul(x, w, precision=precision)


class RMSNorm(nnx.Module):
    """y = w * x / rms(x), the statistics in float32 whatever the activation dtype (as HF does)."""

    def __init__(self, weight: jax.Array, eps: float):
        self.weight = nnx.Param(weight)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


# ------------------------------------------------------------------------------------------ rotary

def _freeze(scaling: dict | None):
    return None if scaling is None else tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                     for k, v in scaling.items()))


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    s = dict(scaling or ())
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(s["factor"])).astype(np.float32)
    if kind == "freq_factors":
        return (inv_freq / np.asarray(s["factors"], np.float32)).astype(np.float32)
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, a smooth blend between.
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported (have: linear, llama3)")


def rope_inv_freq(config: TransformerConfig) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies, scaling applied."""
    return _inv_freq(config.head_dim, float(config.rope_theta), _freeze(config.rope_scaling))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """HF's rotate-half convention: the first and second halves of head_dim are the pair's two parts.

    x: [T, heads, head_dim]; positions: [T] int32. Angles in float32, result in x's dtype.
    """
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    cos = jnp.cos(angles).astype(x.dtype)[:, None, :]
    sin = jnp.sin(angles).astype(x.dtype)[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ------------------------------------------------------------------------------------------ MLP

class GatedMLP(nnx.Module):
    """down(silu(x @ gate) * (x @ up)). gate, up: [H, I]; down: [I, H]."""

    def __init__(self, gate: jax.Array, up: jax.Array, down: jax.Array):
        self.gate_proj = nnx.Param(gate)
        self.up_proj = nnx.Param(up)
        self.down_proj = nnx.Param(down)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(linear(x, self.gate_proj[...])) * linear(x, self.up_proj[...])
        return linear(h, self.down_proj[...])


# ------------------------------------------------------------------------------------------ attention

class Attention(nnx.Module):
    """GQA self-attention over the paged KV pool.

    q: [H, num_heads * head_dim]; k, v: [H, num_kv_heads * head_dim]; o: [num_heads * head_dim, H].
    """

    def __init__(self, config: TransformerConfig, q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array):
        self.config = config
        self.q_proj = nnx.Param(q)
        self.k_proj = nnx.Param(k)
        self.v_proj = nnx.Param(v)
        self.o_proj = nnx.Param(o)

    def __call__(self, x: jax.Array, positions: jax.Array, kv_pages: jax.Array, md: AttentionMetadata,
                 layer: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [T, H] -> ([T, H], kv_pages with this layer's new K/V written at md.slot_mapping)."""
        c = self.config
        t = x.shape[0]
        q = linear(x, self.q_proj[...]).reshape(t, c.num_heads, c.head_dim)
        k = linear(x, self.k_proj[...]).reshape(t, c.num_kv_heads, c.head_dim)
        v = linear(x, self.v_proj[...]).reshape(t, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inv_freq(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        # Write first: the new rows must attend to themselves and to earlier rows of the same step.
        kv_pages = pallas_kernels.write_kv(kv_pages, k, v, md.slot_mapping, layer=layer)
        out = pallas_kernels.ragged_paged_attention(
            q, kv_pages, md.kv_lens, md.page_table, md.cu_q_lens, md.num_seqs,
            sm_scale=1.0 / math.sqrt(c.head_dim), sliding_window=c.sliding_window, layer=layer,
            backend=c.attention_backend, interpret=c.attention_interpret)
        return linear(out.reshape(t, c.num_heads * c.head_dim).astype(x.dtype), self.o_proj[...]), kv_pages
