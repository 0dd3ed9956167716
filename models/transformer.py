"""The decoder every family runs: embed -> layer groups (one lax.scan each) -> norm -> logits.

Canonical weight names (what the loaders produce; Linear weights [in, out]; "layers.*" stacked over
the layers the weight exists in, see param_specs):
  embed_tokens [V, H]      norm [H]      lm_head [H, V] (absent when tied)
  layers.attn_norm, layers.mlp_norm [L, H]             (pre-attention / pre-MLP norms)
  layers.attn_post_norm, layers.mlp_post_norm [L, H]   (sandwich norms: Gemma 2/3)
  layers.q_proj [L, H, Hq*D]  layers.k_proj / v_proj [L, H, Hkv*D]  layers.o_proj [L, Hq*D, H]
  layers.q_bias [L, Hq*D]  layers.k_bias / v_bias [L, Hkv*D]      (Qwen2)
  layers.q_norm, layers.k_norm [L, D]                               (Qwen3, Gemma 3)
  dense layers:  layers.gate_proj / up_proj [Ld, H, I]   layers.down_proj [Ld, I, H]
  MoE layers:    layers.router [Lm, H, E]   layers.experts_gate / experts_up [Lm, E, H, Im]
                 layers.experts_down [Lm, E, Im, H]

Per-layer variation rides in the scan as arrays: each layer's KV-pool index, rope table index and
sliding window (see layers.attention_windows), so Gemma's sliding and full layers compile as one
layer. Layers whose weights differ in structure (dense vs MoE MLP) cannot share a scan: the model
runs one scan per contiguous group of same-kind layers (Mixtral: 1 group; Qwen3-MoE with
mlp_only_layers=[1]: 3). Compile time grows with the number of groups, not of layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.base import AttentionMetadata
from models.config import TransformerConfig
from pallas_kernels.quantized_matmul import QuantizedArray, quantized_matmul
from models.layers import (MoE, Attention, GatedMLP, RMSNorm, attention_windows, embed_lookup, rope_cos_sin,
                           rope_tables)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """shape: stacked over `layers` when that is set; kind: linear | experts | vector | embed."""

    shape: tuple[int, ...]
    kind: str
    layers: tuple[int, ...] | None = None


def param_specs(c: TransformerConfig) -> dict[str, ParamSpec]:
    """Canonical name -> ParamSpec for this config; the loaders fill exactly these."""
    H, qd, kvd, D = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
    every = tuple(range(c.num_layers))
    moe = c.layer_is_moe()
    dense_l = tuple(i for i in every if not moe[i])
    moe_l = tuple(i for i in every if moe[i])
    L = len(every)
    s = {"embed_tokens": ParamSpec((c.vocab_size, H), "embed"), "norm": ParamSpec((H,), "vector")}

    def per_layer(name, shape, kind, layers=every):
        if layers:
            s[name] = ParamSpec((len(layers),) + shape, kind, layers)

    per_layer("layers.attn_norm", (H,), "vector")
    per_layer("layers.mlp_norm", (H,), "vector")
    if c.sandwich_norm:
        per_layer("layers.attn_post_norm", (H,), "vector")
        per_layer("layers.mlp_post_norm", (H,), "vector")
    per_layer("layers.q_proj", (H, qd), "linear")
    per_layer("layers.k_proj", (H, kvd), "linear")
    per_layer("layers.v_proj", (H, kvd), "linear")
    per_layer("layers.o_proj", (qd, H), "linear")
    if c.attention_bias:
        per_layer("layers.q_bias", (qd,), "vector")
        per_layer("layers.k_bias", (kvd,), "vector")
        per_layer("layers.v_bias", (kvd,), "vector")
    if c.qk_norm:
        per_layer("layers.q_norm", (D,), "vector")
        per_layer("layers.k_norm", (D,), "vector")
    I, E, Im = c.intermediate_size, c.num_experts, c.moe_intermediate_size or c.intermediate_size
    per_layer("layers.gate_proj", (H, I), "linear", dense_l)
    per_layer("layers.up_proj", (H, I), "linear", dense_l)
    per_layer("layers.down_proj", (I, H), "linear", dense_l)
    per_layer("layers.router", (H, E), "linear", moe_l)
    per_layer("layers.experts_gate", (E, H, Im), "experts", moe_l)
    per_layer("layers.experts_up", (E, H, Im), "experts", moe_l)
    per_layer("layers.experts_down", (E, Im, H), "experts", moe_l)
    if not c.tie_word_embeddings:
        s["lm_head"] = ParamSpec((H, c.vocab_size), "linear")
    assert L == c.num_layers
    return s


def weight_shapes(c: TransformerConfig) -> dict[str, tuple[int, ...]]:
    return {name: spec.shape for name, spec in param_specs(c).items()}


def random_weights(c: TransformerConfig, seed: int = 0, scale: float = 0.02) -> dict[str, np.ndarray]:
    """N(0, scale) matrices and unit norms: for tests and shape-only (abstract) construction."""
    rng = np.random.default_rng(seed)
    return {name: (np.full(spec.shape, 1.0 - c.norm_offset, np.float32) if name.endswith("norm")
                   else rng.normal(0.0, scale, spec.shape).astype(np.float32))
            for name, spec in param_specs(c).items()}


def layer_groups(c: TransformerConfig) -> list[tuple[int, int, bool]]:
    """Contiguous runs of same-kind layers: (first layer, number of layers, is MoE)."""
    groups: list[list] = []
    for i, is_moe in enumerate(c.layer_is_moe()):
        if groups and groups[-1][2] == is_moe:
            groups[-1][1] += 1
        else:
            groups.append([i, 1, is_moe])
    return [tuple(g) for g in groups]


class DecoderLayer(nnx.Module):
    """norm -> attention (-> post norm) -> residual; norm -> MLP or MoE (-> post norm) -> residual.
    Holds the stacked arrays of a group of layers; the scan slices one layer out at a time."""

    def __init__(self, c: TransformerConfig, w: Mapping[str, jax.Array], moe: bool):
        eps, off = c.rms_norm_eps, c.norm_offset
        opt = lambda name: w.get(f"layers.{name}")
        self.attn_norm = RMSNorm(w["layers.attn_norm"], eps, off)
        self.attn = Attention(c, w["layers.q_proj"], w["layers.k_proj"], w["layers.v_proj"], w["layers.o_proj"],
                              q_bias=opt("q_bias"), k_bias=opt("k_bias"), v_bias=opt("v_bias"),
                              q_norm=opt("q_norm"), k_norm=opt("k_norm"))
        self.attn_post_norm = None if opt("attn_post_norm") is None else RMSNorm(w["layers.attn_post_norm"], eps, off)
        self.mlp_norm = RMSNorm(w["layers.mlp_norm"], eps, off)
        if moe:
            self.mlp = MoE(w["layers.router"], w["layers.experts_gate"], w["layers.experts_up"],
                           w["layers.experts_down"], top_k=c.num_experts_per_tok,
                           norm_topk_prob=c.norm_topk_prob, act=c.hidden_act, expert_parallel=c.expert_parallel)
        else:
            self.mlp = GatedMLP(w["layers.gate_proj"], w["layers.up_proj"], w["layers.down_proj"], c.hidden_act)
        self.mlp_post_norm = None if opt("mlp_post_norm") is None else RMSNorm(w["layers.mlp_post_norm"], eps, off)

    def __call__(self, x, positions, kv_pages, md: AttentionMetadata, layer, rope, window):
        h, kv_pages = self.attn(self.attn_norm(x), positions, kv_pages, md, layer, rope, window)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + h, kv_pages


class DecoderLM(nnx.Module):
    """models.base.CausalLM for every family (the config chooses the family's options).

    weights: canonical name -> array (see module docstring); None gives random weights from rngs.
    dtype: parameter and activation dtype (float32 or bfloat16); logits are always float32.
    """

    def __init__(self, config: TransformerConfig, *, dtype=jnp.float32,
                 weights: Mapping[str, np.ndarray | jax.Array] | None = None, rngs: nnx.Rngs | None = None):
        if weights is None:
            seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1)) if rngs is not None else 0
            weights = random_weights(config, seed)
        specs = param_specs(config)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        w = {name: _as_param(weights[name], dtype) for name in specs}
        self.embed_tokens = nnx.Param(w["embed_tokens"])
        groups = []
        for start, count, moe in layer_groups(config):
            rows = {}
            for name, spec in specs.items():
                if spec.layers is not None and start in spec.layers:
                    first = spec.layers.index(start)
                    rows[name] = jax.tree.map(lambda a: a[first:first + count], w[name])
            groups.append(DecoderLayer(config, rows, moe))
        self.groups = nnx.List(groups)
        self.norm = RMSNorm(w["norm"], config.rms_norm_eps, config.norm_offset)
        # A tied model may be handed a head of its own: the embedding repacked for the CPU's matmul
        # kernels (registry._pack_for_amx), whose layout lookups cannot read.
        head = w["lm_head"] if "lm_head" in w else weights.get("lm_head")
        self.lm_head = None if head is None else nnx.Param(_as_param(head, dtype))

    def canonical_weights(self) -> dict[str, jax.Array]:
        """The canonical name -> stacked array dict this model was built from (the inverse of __init__)."""
        parts: dict[str, list] = {}
        for g in self.groups:
            for path, var in nnx.to_flat_state(nnx.state(g, nnx.Param)):
                key = ".".join(str(p) for p in path)
                parts.setdefault(key, []).append(var.get_value())
        w = {"embed_tokens": self.embed_tokens.get_value(), "norm": self.norm.weight[...]}
        for key, arrs in parts.items():
            w[_CANONICAL[key]] = jax.tree.map(lambda *a: jnp.concatenate(a), *arrs)
        if self.lm_head is not None:
            w["lm_head"] = self.lm_head.get_value()
        return w

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_pages: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """token_ids, positions: [T] int32; kv_pages: [L, num_pages, page_size, 2*Hkv, D].

        Returns (final-normed hidden [T, H], kv_pages). One lax.scan per layer group: a layer is
        compiled once per group, and the pool rides in the carry so each write_kv updates it in place.
        """
        c = self.config
        x = embed_lookup(self.embed_tokens.get_value(), token_ids, self.dtype)
        if c.embed_scale:  # HF rounds sqrt(hidden) to the activation dtype first
            x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
        _, rope_index = rope_tables(c)
        cos, sin = rope_cos_sin(c, positions, md)  # [n_tables, T, D/2], shared by all layers
        mode, per_layer_window, distinct = attention_windows(c)
        live_rows = md.cu_q_lens[jnp.asarray(md.num_seqs, jnp.int32).reshape(())]  # rows past it are the bucket's padding
        start = 0
        for group in self.groups:
            graphdef, stacked = nnx.split(group)
            count = jax.tree.leaves(stacked)[0].shape[0]
            ids = np.arange(start, start + count, dtype=np.int32)
            win = (np.zeros(count, np.int32) if per_layer_window is None
                   else per_layer_window[start:start + count])
            # Quantized weights stay whole and get this layer's index instead of being sliced: the
            # ggml custom call reads the stack in place (a slice would be a copy every layer).
            is_q = lambda a: isinstance(a, QuantizedArray)
            leaves, treedef = jax.tree.flatten(stacked, is_leaf=is_q)
            scanned = [None if is_q(a) else a for a in leaves]
            xs = (scanned, jnp.asarray(ids), jnp.asarray(np.asarray(rope_index, np.int32)[ids]), jnp.asarray(win),
                  jnp.arange(count, dtype=jnp.int32))

            def body(carry, xs, graphdef=graphdef, leaves=leaves, treedef=treedef):
                h, pool = carry
                layer_leaves, layer, rope_i, w, index = xs
                # one index shared by all quantized weights, so weights fed the same input fuse in one call
                layer_state = treedef.unflatten([a.at_layer(index, live_rows) if is_q(a) else i
                                                 for a, i in zip(leaves, layer_leaves)])
                window = (("static", distinct[0]) if mode == "static" else ("traced", w) if mode == "traced"
                          else ("switch", (w, distinct)))
                h, pool = nnx.merge(graphdef, layer_state)(h, positions, pool, md, layer, (cos[rope_i], sin[rope_i]),
                                                           window)
                return (h, pool), None

            (x, kv_pages), _ = jax.lax.scan(body, (x, kv_pages), xs)
            start += count
        return self.norm(x), kv_pages

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [R, H] -> float32 logits [R, V] (soft-capped when the family caps them)."""
        head = (self.embed_tokens if self.lm_head is None else self.lm_head).get_value()
        cap = self.config.final_logit_softcap
        if isinstance(head, QuantizedArray):  # [V, H] either way: a quantized weight is [out, in]
            logits = quantized_matmul(hidden.astype(jnp.float32), head)
            return logits if cap is None else cap * jnp.tanh(logits / cap)
        if self.lm_head is None:
            dims = (((1,), (1,)), ((), ()))
        else:
            dims = (((1,), (0,)), ((), ()))
        precision = jax.lax.Precision.HIGHEST if head.dtype == jnp.float32 else None
        logits = jax.lax.dot_general(hidden.astype(self.dtype), head, dims, precision=precision,
                                     preferred_element_type=jnp.float32)
        return logits if cap is None else cap * jnp.tanh(logits / cap)


def _as_param(w, dtype):
    """A loaded weight as a parameter: float arrays in the model dtype; quantized ones as they are."""
    if isinstance(w, QuantizedArray):
        return jax.tree.map(jnp.asarray, w)
    return jnp.asarray(w, dtype)


# Module path inside a DecoderLayer -> canonical name (for canonical_weights).
_CANONICAL = {
    "attn_norm.weight": "layers.attn_norm", "mlp_norm.weight": "layers.mlp_norm",
    "attn_post_norm.weight": "layers.attn_post_norm", "mlp_post_norm.weight": "layers.mlp_post_norm",
    **{f"attn.{p}_proj.weight": f"layers.{p}_proj" for p in "qkvo"},
    **{f"attn.{p}_proj.bias": f"layers.{p}_bias" for p in "qkv"},
    "attn.q_norm.weight": "layers.q_norm", "attn.k_norm.weight": "layers.k_norm",
    **{f"mlp.{p}_proj.weight": f"layers.{p}_proj" for p in ("gate", "up", "down")},
    "mlp.router.weight": "layers.router", "mlp.experts_gate": "layers.experts_gate",
    "mlp.experts_up": "layers.experts_up", "mlp.experts_down": "layers.experts_down",
}
