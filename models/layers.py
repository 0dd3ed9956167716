"""Building blocks shared by every family: the weight type (Linear), RMSNorm, rotary embedding, gated MLP,
mixture of experts, paged attention. A family chooses their options through TransformerConfig; no
family has its own copy of attention or MLP.

Modules are built from arrays (loaded or random) rather than initializers: every weight comes from a
checkpoint, and a model's layers are modules whose arrays carry a leading layer axis (the model scans
over it, see transformer.py). Linear weights are stored [in, out] so a layer is `x @ w`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from pallas_kernels.quantized_matmul import QuantizedArray, quantized_matmuls, quantized_swiglu, take_rows
from pallas_kernels.ragged_paged_attention import resolve_backend
from models.base import AttentionMetadata
from models.config import TransformerConfig
from models import sharding
from jax.sharding import PartitionSpec as P

# A window no sequence reaches: the traced per-layer window of a full-attention layer.
NO_WINDOW = 1 << 30


def _precision(w: jax.Array):
    # float32 weights get full-precision matmuls: GPUs/TPUs otherwise round f32 operands to TF32/bf16,
    # and f32 mode exists for exact parity with HF references.
    return jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None


def linear(x: jax.Array, w: jax.Array | QuantizedArray) -> jax.Array:
    """x [..., in] @ w [in, out], or @ W^T for a quantized W [out, in]."""
    if isinstance(w, QuantizedArray):
        return _quantized_linears(x, [w])[0]
    return jnp.matmul(x, w, precision=_precision(w))


def _quantized_linears(x: jax.Array, ws: list[QuantizedArray]) -> list[jax.Array]:
    """x [..., in] @ W_i^T -> [..., out_i] for each quantized W_i [out_i, in] (one call where it can)."""
    ys = quantized_matmuls(x.reshape(-1, x.shape[-1]), ws)
    return [y.reshape(x.shape[:-1] + (y.shape[-1],)) for y in ys]


class Linear(nnx.Module):
    """The one weight type of every projection (and the untied lm_head): weight [in, out] (+ bias [out]),
    or a QuantizedArray [out, in] (pallas_kernels/quantized_matmul), which every family thus takes.

    axes: logical axis names of the float weight ("embed", "heads", "kv_heads", "mlp", "vocab",
    "experts"), what sharding rules map onto the mesh (reversed for a quantized one).
    With a leading layer axis (stacked layers) weight is [L, in, out]; the scan hands out one layer.
    """

    def __init__(self, weight: jax.Array, bias: jax.Array | None = None, *, axes: tuple[str, ...] = ()):
        self.weight = nnx.Param(weight)
        self.bias = None if bias is None else nnx.Param(bias)
        self.axes = axes

    def __call__(self, x: jax.Array) -> jax.Array:
        y = linear(x, self.weight.get_value())
        return y if self.bias is None else y + self.bias[...]


def project(x: jax.Array, *projections: Linear) -> list[jax.Array]:
    """Several projections of the same input: quantized weights share one matmul call (see
    quantized_matmuls: one ggml graph on CPU), float ones are a matmul each."""
    weights = [p.weight.get_value() for p in projections]
    if len(weights) > 1 and all(isinstance(w, QuantizedArray) for w in weights):
        ys = _quantized_linears(x, weights)
        return [y if p.bias is None else y + p.bias[...] for y, p in zip(ys, projections)]
    return [p(x) for p in projections]


class RMSNorm(nnx.Module):
    """y = (offset + w) * x / rms(x), statistics in float32 (as HF does).

    offset 0 (Llama): HF casts x / rms(x) to the activation dtype, then scales. offset 1 (Gemma, whose
    checkpoints store w - 1): HF scales in float32 and casts last. Same in float32, not in bfloat16.
    """

    def __init__(self, weight: jax.Array, eps: float, offset: float = 0.0):
        self.weight = nnx.Param(weight)
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (y * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
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
    if kind in ("longrope", "su"):  # the short factors; rope_cos_sin switches to the long ones
        return (inv_freq / np.asarray(s["short_factor"], np.float32)).astype(np.float32)
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
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported (have: linear, llama3, longrope)")


def rope_inv_freq(config: TransformerConfig) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies of the (full-attention) layers, scaling applied."""
    return _inv_freq(config.head_dim, float(config.rope_theta), _freeze(config.rope_scaling))


def rope_tables(config: TransformerConfig) -> tuple[np.ndarray, tuple[int, ...]]:
    """([n_tables, head_dim // 2] inverse frequencies, each layer's table index).

    Gemma 3's sliding layers rope with their own base and no scaling; the scan carries the index, so
    layers of both kinds compile as one.
    """
    tables = [rope_inv_freq(config)]
    index = [0] * config.num_layers
    if config.local_rope_theta is not None:
        tables.append(_inv_freq(config.head_dim, float(config.local_rope_theta), None))
        index = [1 if w is not None else 0 for w in config.layer_windows()]
    return np.stack(tables), tuple(index)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's rotate-half convention: the first and second halves of head_dim are the pair's two parts.

    x [T, heads, head_dim] rotated by float32 cos, sin [T, head_dim // 2]; result in x's dtype.
    """
    cos = cos.astype(x.dtype)[:, None, :]
    sin = sin.astype(x.dtype)[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def longrope(config: TransformerConfig):
    """Phi-3's LongRoPE ("longrope" / "su"): (short inv_freq, long inv_freq, cos/sin scale, original
    context). Frequencies are divided per dimension by short_factor or long_factor."""
    s = config.rope_scaling
    orig = int(s["original_max_position_embeddings"])
    base = _inv_freq(config.head_dim, float(config.rope_theta), None)
    short = (base / np.asarray(s["short_factor"], np.float32)).astype(np.float32)
    long = (base / np.asarray(s["long_factor"], np.float32)).astype(np.float32)
    scale = s.get("attention_factor")
    if scale is None:
        factor = float(s.get("factor") or config.max_position_embeddings / orig)
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return short, long, float(scale), orig


def rope_cos_sin(config: TransformerConfig, positions: jax.Array, md: AttentionMetadata):
    """cos, sin [n_tables, T, head_dim // 2] float32 for this step, computed once for all layers.

    LongRoPE picks the long factors for every row of a sequence longer than the original context
    (its length after this step, md.kv_lens), the short ones otherwise: per sequence, so a request's
    result does not depend on what it is batched with (vLLM decides per batch). HF recomputes the
    whole sequence with the long factors once it crosses; a paged cache keeps keys rotated as they
    were, so outputs agree with HF while a sequence stays on one side of the original context.
    """
    tables, _ = rope_tables(config)
    pos = positions.astype(jnp.float32)
    angles = pos[None, :, None] * jnp.asarray(tables)[:, None, :]
    scale = 1.0
    if _rope_kind(config) == "longrope":
        _, long, scale, orig = longrope(config)
        t, max_seqs = positions.shape[0], md.kv_lens.shape[0]
        # entries of cu_q_lens past num_seqs may be any padding: make them sorted for searchsorted
        n = jnp.asarray(md.num_seqs, jnp.int32).reshape(())
        cu = jnp.where(jnp.arange(max_seqs + 1) <= n, md.cu_q_lens, md.cu_q_lens[n])
        seq = jnp.clip(jnp.searchsorted(cu[1:], jnp.arange(t), side="right"), 0, max_seqs - 1)
        use_long = md.kv_lens[seq] > orig
        angles = jnp.where(use_long[None, :, None], (pos[:, None] * jnp.asarray(long)[None, :])[None], angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def _rope_kind(config: TransformerConfig) -> str:
    s = config.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    return "longrope" if kind in ("longrope", "su") else kind


# ------------------------------------------------------------------------------------------ MLP

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


class GatedMLP(nnx.Module):
    """down(act(x @ gate) * (x @ up)). gate, up: [H, I]; down: [I, H]."""

    def __init__(self, gate: jax.Array, up: jax.Array, down: jax.Array, act: str = "silu"):
        self.gate_proj = Linear(gate, axes=("embed", "mlp"))
        self.up_proj = Linear(up, axes=("embed", "mlp"))
        self.down_proj = Linear(down, axes=("mlp", "embed"))
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_w, up_w = self.gate_proj.weight.get_value(), self.up_proj.weight.get_value()
        if (self.act == "silu" and isinstance(gate_w, QuantizedArray) and isinstance(up_w, QuantizedArray)
                and self.gate_proj.bias is None and self.up_proj.bias is None):
            h = quantized_swiglu(x.reshape(-1, x.shape[-1]), gate_w, up_w)
            if h is not None:
                return self.down_proj(h.reshape(x.shape[:-1] + h.shape[-1:]))
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(ACTIVATIONS[self.act](gate) * up)


def route(x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool):
    """Top-k experts per token and their weights, in float32 (as HF does): softmax over all experts,
    keep k, optionally renormalize. x [T, H]; router [H, E] -> (weights [T, k] f32, experts [T, k])."""
    logits = jnp.matmul(x.astype(jnp.float32), router.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows of x sorted by expert, group_sizes[e] of them for expert e: x [M, in] @ w[e] [in, out].
    One ragged_dot (grouped GEMM kernels on TPU/GPU), however many experts and whatever the routing."""
    return jax.lax.ragged_dot(x, w, group_sizes, precision=_precision(w))


def moe_forward(x, weights, experts, gate, up, down, act: str = "silu"):
    """Dropless MoE: every (token, chosen expert) pair is computed; no capacity, no padding per expert.

    x [T, H]; weights, experts [T, k]; gate, up [E, H, I]; down [E, I, H] -> [T, H].
    The T*k pairs are sorted by expert so each expert's rows are contiguous for the grouped matmul,
    then weighted and summed back onto their tokens.
    """
    t, k = experts.shape
    num_experts = gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[token]
    h = ACTIVATIONS[act](grouped_matmul(xs, gate, group_sizes)) * grouped_matmul(xs, up, group_sizes)
    y = grouped_matmul(h, down, group_sizes)
    y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(y).astype(x.dtype)


def moe_local_experts(x, weights, experts, gate, up, down, act: str = "silu"):
    """Expert parallel, one device's part (under shard_map): gate/up/down hold this device's E/n
    consecutive experts; every device sees every token (attention is tensor-parallel, so x is
    replicated) and computes only the (token, expert) pairs routed to its experts. The caller's psum
    over the model axis is the combine; the dispatch is the replicated input, vLLM's "naive"
    all-to-all, exact and without capacity limits.
    """
    t, k = experts.shape
    e_local = gate.shape[0]
    num_experts = e_local * jax.lax.axis_size(sharding.MODEL)
    first = jax.lax.axis_index(sharding.MODEL) * e_local
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    sizes = jax.lax.dynamic_slice(counts, (first,), (e_local,))
    start = jnp.sum(jnp.where(jnp.arange(num_experts) < first, counts, 0))
    idx = jnp.arange(t * k)
    valid = idx < jnp.sum(sizes)
    pair = order[jnp.clip(start + idx, 0, t * k - 1)]  # this device's pairs first, in expert order
    token = pair // k
    xs = x[token]
    h = ACTIVATIONS[act](grouped_matmul(xs, gate, sizes)) * grouped_matmul(xs, up, sizes)
    y = grouped_matmul(h, down, sizes).astype(jnp.float32)
    y = jnp.where(valid[:, None], y * weights.reshape(-1)[pair][:, None], 0.0)
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(y)


class MoE(nnx.Module):
    """Router [H, E] + experts' gated MLPs stacked on an expert axis: gate, up [E, H, I]; down [E, I, H].

    Tensor parallel splits every expert's width (GSPMD, like the dense MLP); with expert_parallel each
    device holds whole experts instead (see moe_local_experts).
    """

    def __init__(self, router, gate, up, down, *, top_k: int, norm_topk_prob: bool, act: str = "silu",
                 expert_parallel: bool = False):
        self.router = Linear(router, axes=("embed", None))
        self.experts_gate = nnx.Param(gate)
        self.experts_up = nnx.Param(up)
        self.experts_down = nnx.Param(down)
        self.top_k, self.norm_topk_prob, self.act = top_k, norm_topk_prob, act
        self.expert_parallel = expert_parallel

    def __call__(self, x: jax.Array) -> jax.Array:
        weights, experts = route(x, self.router.weight[...], self.top_k, self.norm_topk_prob)
        gate, up, down = self.experts_gate[...], self.experts_up[...], self.experts_down[...]
        n = sharding.model_axis_size()
        if self.expert_parallel and n > 1 and gate.shape[0] % n == 0:
            local = lambda *a: jax.lax.psum(moe_local_experts(*a, act=self.act), sharding.MODEL)
            e = P(sharding.MODEL, None, None)
            y = jax.shard_map(local, in_specs=(P(), P(), P(), e, e, e), out_specs=P(), check_vma=False)(
                x, weights, experts, gate, up, down)
            return y.astype(x.dtype)
        return moe_forward(x, weights, experts, gate, up, down, self.act)


# ------------------------------------------------------------------------------------------ attention

class Attention(nnx.Module):
    """GQA self-attention over the paged KV pool.

    q: [H, num_heads * head_dim]; k, v: [H, num_kv_heads * head_dim]; o: [num_heads * head_dim, H];
    optional q/k/v biases, optional per-head q/k RMSNorms [head_dim] (applied before rope).
    """

    def __init__(self, config: TransformerConfig, q, k, v, o, *, q_bias=None, k_bias=None, v_bias=None,
                 q_norm=None, k_norm=None):
        self.config = config
        self.q_proj = Linear(q, q_bias, axes=("embed", "heads"))
        self.k_proj = Linear(k, k_bias, axes=("embed", "kv_heads"))
        self.v_proj = Linear(v, v_bias, axes=("embed", "kv_heads"))
        self.o_proj = Linear(o, axes=("heads", "embed"))
        eps, off = config.rms_norm_eps, config.norm_offset
        self.q_norm = None if q_norm is None else RMSNorm(q_norm, eps, off)
        self.k_norm = None if k_norm is None else RMSNorm(k_norm, eps, off)

    def __call__(self, x: jax.Array, positions: jax.Array, kv_pages: jax.Array, md: AttentionMetadata,
                 layer: jax.Array, rope, window) -> tuple[jax.Array, jax.Array]:
        """x: [T, H] -> ([T, H], kv_pages with this layer's new K/V written at md.slot_mapping).

        rope: this layer's (cos, sin) [T, head_dim // 2]; window: its sliding window, see attention_windows.
        """
        c = self.config
        t = x.shape[0]
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.reshape(t, c.num_heads, c.head_dim)
        k = k.reshape(t, c.num_kv_heads, c.head_dim)
        v = v.reshape(t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, *rope), rotate(k, *rope)
        scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        out, kv_pages = paged_attention(c, q, k, v, kv_pages, md, layer, window, scale)
        return self.o_proj(out.reshape(t, c.num_heads * c.head_dim).astype(x.dtype)), kv_pages


def _write_and_attend(c: TransformerConfig, scale, window, q, k, v, kv_pages, md, layer, window_value):
    """One device's attention: write the new K/V, then attend. Its q may hold a slice of the heads."""
    # Write first: the new rows must attend to themselves and to earlier rows of the same step.
    kv_pages = pallas_kernels.write_kv(kv_pages, k, v, md.slot_mapping, layer=layer)
    n = sharding.model_axis_size()
    tiled = n > 1 and not sharding.kv_heads_sharded(c.num_kv_heads, n)
    t, g = q.shape[0], q.shape[1]
    if tiled:
        # Replicated KV heads: this device's g query heads (global first head i*g) may belong to any KV
        # group. Give the kernel every group a copy of them ([T, Hkv*g]: head a*g+j reads KV head a) and
        # keep, for each local head, the copy that read its own group. Costs Hkv x a shard's attention
        # (at most all heads), never a copy of the pool.
        q = jnp.tile(q, (1, c.num_kv_heads, 1))
    attend = functools.partial(
        pallas_kernels.ragged_paged_attention, q, kv_pages, md.kv_lens, md.page_table, md.cu_q_lens,
        md.num_seqs, sm_scale=scale, soft_cap=c.attn_logit_softcap, layer=layer,
        backend=c.attention_backend, interpret=c.attention_interpret)
    kind = window[0]
    if kind == "static":
        out = attend(sliding_window=window[1])
    elif kind == "traced":
        out = attend(sliding_window=window_value)
    else:  # "switch": the Pallas kernels take a static window; pick among the model's few
        out = jax.lax.switch(window_value, [functools.partial(attend, sliding_window=w) for w in window[1]])
    if tiled:
        group = c.num_heads // c.num_kv_heads
        local = jnp.arange(g)
        kv_head = (jax.lax.axis_index(sharding.MODEL) * g + local) // group
        out = out.reshape(t, c.num_kv_heads, g, -1)[:, kv_head, local]
    return out, kv_pages


def paged_attention(c: TransformerConfig, q, k, v, kv_pages, md: AttentionMetadata, layer, window, scale):
    """write_kv + ragged paged attention, per head shard under shard_map when traced on a mesh with a
    "model" axis (the kernels are per-device programs; GSPMD cannot split a Pallas call). q [T, Hq, D]
    and the output are split over heads; the pool and k/v over KV heads or, with too few, replicated."""
    kind, value = window
    # A static window (or the switch's tuple of windows) is a Python value, not an operand.
    static = ("static", value) if kind == "static" else ("switch", value[1]) if kind == "switch" else ("traced",)
    w = None if kind == "static" else value[0] if kind == "switch" else value
    f = functools.partial(_write_and_attend, c, scale, static)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or sharding.MODEL not in mesh.axis_names:
        return f(q, k, v, kv_pages, md, layer, w)
    n = mesh.shape[sharding.MODEL]
    heads = P(None, sharding.MODEL, None)
    kv = heads if sharding.kv_heads_sharded(c.num_kv_heads, n) else P()
    pool = sharding.pool_spec(c, n)
    if isinstance(kv_pages, pallas_kernels.QuantizedPages):
        pool = pallas_kernels.QuantizedPages(pool, P(*pool[:-1]), kv_pages.value_dtype)
    return jax.shard_map(f, in_specs=(heads, kv, kv, pool, P(), P(), P()),
                         out_specs=(heads, pool), check_vma=False)(
        q, k, v, kv_pages, md, layer, w)


def embed_lookup(table: jax.Array | QuantizedArray, ids: jax.Array, dtype=None) -> jax.Array:
    """table [V, H] rows for ids [T]. Vocab-parallel on a mesh: each device looks up the ids in its
    slice of the vocabulary, zeros elsewhere, and one all-reduce sums the (exact) result. A quantized
    table dequantizes only the rows looked up."""
    if isinstance(table, QuantizedArray):
        return take_rows(table, ids, dtype)
    n = sharding.model_axis_size()
    if not sharding.vocab_sharded(table.shape[0], n):
        return jnp.take(table, ids, axis=0)

    def local(tab, ids):
        lo = jax.lax.axis_index(sharding.MODEL) * tab.shape[0]
        mine = (ids >= lo) & (ids < lo + tab.shape[0])
        rows = jnp.take(tab, jnp.where(mine, ids - lo, 0), axis=0)
        return jax.lax.psum(jnp.where(mine[:, None], rows, jnp.zeros_like(rows)), sharding.MODEL)

    return jax.shard_map(local, in_specs=(P(sharding.MODEL, None), P()), out_specs=P(), check_vma=False)(table, ids)


def attention_windows(config: TransformerConfig):
    """How the layer scan hands each layer its sliding window.

    One window for all layers: ("static", w), a Python value every kernel takes. Several (Gemma's
    sliding + full layers): the reference takes the window as a traced per-layer int ("traced"; the
    scan carries it, NO_WINDOW for full layers); the Pallas kernels take it static, so the scan carries
    an index into the model's distinct windows and lax.switch picks a kernel instance ("switch").
    Returns (mode, per-layer int32 array or None, distinct windows).
    """
    per_layer = config.layer_windows()
    distinct = tuple(sorted(set(per_layer), key=lambda w: NO_WINDOW if w is None else w))
    if len(distinct) == 1:
        return "static", None, distinct
    if resolve_backend(config.attention_backend, config.attention_interpret) == "reference":
        return "traced", np.array([NO_WINDOW if w is None else w for w in per_layer], np.int32), distinct
    return "switch", np.array([distinct.index(w) for w in per_layer], np.int32), distinct
