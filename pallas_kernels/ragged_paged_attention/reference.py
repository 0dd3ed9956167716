"""Pure-jnp ragged paged attention: the oracle every kernel is tested against, and the CPU path.

Page pool layout (shared with the TPU and GPU kernels):
  kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]
            K of kv head h at index 2*h, V at 2*h + 1 (K and V interleaved along heads, so one
            page DMA brings both). With `layer` given, kv_pages carries a leading layer axis
            [num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim] and only that layer is
            read/written; this lets a model scan over layers with the whole pool as its carry and
            never copy a layer's slice.

Ragged batch:
  q:          [T, num_q_heads, head_dim]  rows of all sequences, concatenated
  cu_q_lens:  [S + 1]  int32; rows of sequence s are cu_q_lens[s] : cu_q_lens[s + 1]
  kv_lens:    [S]      int32; tokens of sequence s in the pool *including* its new rows, so
                       new row i of s sits at position kv_lens[s] - q_len_s + i
  page_table: [S, max_pages_per_seq] int32
  num_seqs:   [1] or scalar int32; sequences >= num_seqs and rows >= cu_q_lens[num_seqs] are padding:
              they produce zeros and read only page 0 (never an out-of-range page).

Optional quantized pages: int8 / float8 pages are dequantized as `page * scale`, with k_scale and
v_scale broadcastable to [num_pages, num_kv_heads] (a scalar, per head [num_kv_heads], or per page
and head [num_pages, num_kv_heads]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keys are processed this many tokens at a time; a block spans whole pages.
_KEY_BLOCK_TOKENS = 128


def _layer_view(kv_pages: jax.Array, layer):
    """Shape of one layer's pool without slicing it out (slicing would copy a whole layer)."""
    if layer is None:
        return kv_pages.shape
    return kv_pages.shape[1:]


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array, *, layer=None,
             k_scale=None, v_scale=None) -> jax.Array:
    """Scatters new keys/values into the page pool in place (donate kv_pages to the enclosing jit).

    k, v: [T, num_kv_heads, head_dim]; slot_mapping: [T] int32 = page * page_size + offset, and any
    negative slot (padding rows) writes nothing. Quantized pools store round(x / scale) clipped to the
    dtype's range, with the given per-head / per-page scales.
    """
    num_pages, page_size, two_h, head_dim = _layer_view(kv_pages, layer)
    num_slots = num_pages * page_size
    new = jnp.stack([k, v], axis=2).reshape(k.shape[0], two_h, head_dim)  # k0 v0 k1 v1 ...
    slot = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range -> dropped
    if jnp.issubdtype(kv_pages.dtype, jnp.integer) or kv_pages.dtype.itemsize == 1:
        new = _quantize(new, slot // page_size, kv_pages.dtype, k_scale, v_scale)
    new = new.astype(kv_pages.dtype)
    page, offset = slot // page_size, slot % page_size
    if layer is None:
        return kv_pages.at[page, offset].set(new, mode="drop")
    return kv_pages.at[layer, page, offset].set(new, mode="drop")


def _scales_for(scale, pages, num_kv_heads):
    """Broadcasts a scale to [..., num_kv_heads] for the given page ids."""
    scale = jnp.asarray(1.0 if scale is None else scale, jnp.float32)
    if scale.ndim == 2:  # [num_pages, H]
        return scale[jnp.clip(pages, 0, scale.shape[0] - 1)]
    return jnp.broadcast_to(scale, pages.shape + (num_kv_heads,))


def _quantize(new, pages, dtype, k_scale, v_scale):
    h = new.shape[1] // 2
    ks = _scales_for(k_scale, pages, h)
    vs = _scales_for(v_scale, pages, h)
    scale = jnp.stack([ks, vs], axis=-1).reshape(new.shape[0], 2 * h)[..., None]
    x = new.astype(jnp.float32) / scale
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        x = jnp.clip(jnp.round(x), info.min, info.max)
    else:
        info = jnp.finfo(dtype)
        x = jnp.clip(x, float(info.min), float(info.max))
    return x


def ragged_paged_attention(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array, page_table: jax.Array,
                           cu_q_lens: jax.Array, num_seqs: jax.Array, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale=None, v_scale=None, layer=None) -> jax.Array:
    """Attention of each ragged row over its own sequence's pages. Returns [T, num_q_heads, head_dim].

    Online softmax over key blocks of whole pages; the loop runs only as many blocks as the longest
    live sequence needs, so short batches pay for short contexts.
    """
    num_rows, num_q_heads, head_dim = q.shape
    _, page_size, two_h, _ = _layer_view(kv_pages, layer)
    num_kv_heads = two_h // 2
    group = num_q_heads // num_kv_heads
    max_seqs, max_pages = page_table.shape
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())

    # Which sequence each row belongs to, and its absolute position.
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    seq_of_row = jnp.clip(jnp.searchsorted(cu_q_lens[1:], rows, side="right"), 0, max_seqs - 1)
    live_row = rows < cu_q_lens[num_seqs]
    live_seq = jnp.arange(max_seqs) < num_seqs
    kv_lens = jnp.where(live_seq, kv_lens, 0)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    row_kv_len = kv_lens[seq_of_row]
    q_pos = row_kv_len - q_lens[seq_of_row] + (rows - cu_q_lens[seq_of_row])
    row_pages = jnp.where(live_row[:, None], page_table[seq_of_row], 0)  # [T, P]

    pages_per_block = max(1, _KEY_BLOCK_TOKENS // page_size)
    num_blocks = max(1, -(-max_pages // pages_per_block))
    pad = num_blocks * pages_per_block - max_pages
    if pad:
        row_pages = jnp.pad(row_pages, ((0, 0), (0, pad)))
    block_tokens = pages_per_block * page_size
    longest = jnp.max(jnp.where(live_row, row_kv_len, 0))
    blocks_needed = (longest + block_tokens - 1) // block_tokens

    qg = q.astype(jnp.float32).reshape(num_rows, num_kv_heads, group, head_dim) * sm_scale
    quantized = kv_pages.dtype.itemsize == 1

    def body(b, carry):
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(row_pages, b * pages_per_block, pages_per_block, axis=1)
        kv = kv_pages[pages] if layer is None else kv_pages[layer, pages]  # [T, ppb, ps, 2H, D]
        kv = kv.reshape(num_rows, block_tokens, num_kv_heads, 2, head_dim).astype(jnp.float32)
        k, v = kv[..., 0, :], kv[..., 1, :]  # [T, K, H, D]
        if quantized or k_scale is not None or v_scale is not None:
            tok_pages = jnp.repeat(pages, page_size, axis=1)  # [T, K]
            k = k * _scales_for(k_scale, tok_pages, num_kv_heads)[..., None]
            v = v * _scales_for(v_scale, tok_pages, num_kv_heads)[..., None]
        s = jnp.einsum("thgd,tkhd->thgk", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = b * block_tokens + jnp.arange(block_tokens)
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < row_kv_len[:, None])
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("thgk,tkhd->thgd", p, v)
        return m_new, l, acc

    init = (jnp.full((num_rows, num_kv_heads, group), -jnp.inf, jnp.float32),
            jnp.zeros((num_rows, num_kv_heads, group), jnp.float32),
            jnp.zeros((num_rows, num_kv_heads, group, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, jnp.minimum(blocks_needed, num_blocks), body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    out = jnp.where(live_row[:, None, None, None], out, 0.0)
    return out.reshape(num_rows, num_q_heads, head_dim).astype(q.dtype)
