"""Llama family (Llama 2/3/3.1, SmolLM2, Mistral without sliding window) as a Flax NNX module.

Canonical weight names (what the loaders produce; L = num_layers, linear weights [in, out]):
  embed_tokens [V, H]          norm [H]          lm_head [H, V] (absent when tied)
  layers.input_norm [L, H]     layers.post_attention_norm [L, H]
  layers.q_proj [L, H, Hq*D]   layers.k_proj / v_proj [L, H, Hkv*D]   layers.o_proj [L, Hq*D, H]
  layers.gate_proj / up_proj [L, H, I]                                layers.down_proj [L, I, H]
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.base import AttentionMetadata
from models.config import TransformerConfig
from models.layers import Attention, GatedMLP, RMSNorm


def weight_shapes(c: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape; the loaders check every tensor against this."""
    L, H, I = c.num_layers, c.hidden_size, c.intermediate_size
    qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {
        "embed_tokens": (c.vocab_size, H), "norm": (H,),
        "layers.input_norm": (L, H), "layers.post_attention_norm": (L, H),
        "layers.q_proj": (L, H, qd), "layers.k_proj": (L, H, kvd), "layers.v_proj": (L, H, kvd),
        "layers.o_proj": (L, qd, H),
        "layers.gate_proj": (L, H, I), "layers.up_proj": (L, H, I), "layers.down_proj": (L, I, H),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (H, c.vocab_size)
    return shapes


# Canonical name -> tensor name in a HF checkpoint / in a llama.cpp GGUF ("{i}" = layer index).
HF_NAMES = {
    "embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
    "layers.input_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.post_attention_norm": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers.{p}_proj": f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"layers.{p}_proj": f"model.layers.{{i}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
GGUF_NAMES = {
    "embed_tokens": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight",
    "layers.input_norm": "blk.{i}.attn_norm.weight", "layers.post_attention_norm": "blk.{i}.ffn_norm.weight",
    "layers.q_proj": "blk.{i}.attn_q.weight", "layers.k_proj": "blk.{i}.attn_k.weight",
    "layers.v_proj": "blk.{i}.attn_v.weight", "layers.o_proj": "blk.{i}.attn_output.weight",
    "layers.gate_proj": "blk.{i}.ffn_gate.weight", "layers.up_proj": "blk.{i}.ffn_up.weight",
    "layers.down_proj": "blk.{i}.ffn_down.weight",
}


def random_weights(c: TransformerConfig, seed: int = 0, scale: float = 0.02) -> dict[str, np.ndarray]:
    """N(0, scale) matrices and unit norms: for tests and shape-only (abstract) construction."""
    rng = np.random.default_rng(seed)
    return {name: (np.ones(shape, np.float32) if name.endswith("norm")
                   else rng.normal(0.0, scale, shape).astype(np.float32))
            for name, shape in weight_shapes(c).items()}


class DecoderLayer(nnx.Module):
    """Pre-norm attention + pre-norm gated MLP, each with a residual. Holds ONE layer's or ALL layers'
    (stacked) arrays: the model builds it stacked and the scan slices it per layer."""

    def __init__(self, config: TransformerConfig, w: Mapping[str, jax.Array]):
        self.input_norm = RMSNorm(w["layers.input_norm"], config.rms_norm_eps)
        self.attn = Attention(config, w["layers.q_proj"], w["layers.k_proj"], w["layers.v_proj"],
                              w["layers.o_proj"])
        self.post_attention_norm = RMSNorm(w["layers.post_attention_norm"], config.rms_norm_eps)
        self.mlp = GatedMLP(w["layers.gate_proj"], w["layers.up_proj"], w["layers.down_proj"])

    def __call__(self, x, positions, kv_pages, md: AttentionMetadata, layer):
        h, kv_pages = self.attn(self.input_norm(x), positions, kv_pages, md, layer)
        x = x + h
        x = x + self.mlp(self.post_attention_norm(x))
        return x, kv_pages


class LlamaForCausalLM(nnx.Module):
    """models.base.CausalLM for Llama-like checkpoints.

    weights: canonical name -> array (see module docstring); None gives random weights from rngs.
    dtype: parameter and activation dtype (float32 or bfloat16); logits are always float32.
    """

    def __init__(self, config: TransformerConfig, *, dtype=jnp.float32,
                 weights: Mapping[str, np.ndarray | jax.Array] | None = None, rngs: nnx.Rngs | None = None):
        if weights is None:
            seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1)) if rngs is not None else 0
            weights = random_weights(config, seed)
        w = {name: jnp.asarray(weights[name], dtype) for name in weight_shapes(config)}
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(w["embed_tokens"])
        self.layers = DecoderLayer(config, w)
        self.norm = RMSNorm(w["norm"], config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(w["lm_head"])

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_pages: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """token_ids, positions: [T] int32; kv_pages: [L, num_pages, page_size, 2*Hkv, D].

        Returns (final-normed hidden [T, H], kv_pages). One lax.scan over the stacked layers: one
        layer is compiled once, and the pool rides in the carry so each write_kv updates it in place.
        """
        x = jnp.take(self.embed_tokens[...], token_ids, axis=0)
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, xs):
            h, pool = carry
            layer_state, layer = xs
            h, pool = nnx.merge(graphdef, layer_state)(h, positions, pool, md, layer)
            return (h, pool), None

        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x, kv_pages), _ = jax.lax.scan(body, (x, kv_pages), (stacked, layer_ids))
        return self.norm(x), kv_pages

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [R, H] -> float32 logits [R, V]."""
        if self.lm_head is None:
            head, dims = self.embed_tokens[...], (((1,), (1,)), ((), ()))
        else:
            head, dims = self.lm_head[...], (((1,), (0,)), ((), ()))
        precision = jax.lax.Precision.HIGHEST if head.dtype == jnp.float32 else None
        return jax.lax.dot_general(hidden.astype(self.dtype), head, dims, precision=precision,
                                   preferred_element_type=jnp.float32)
