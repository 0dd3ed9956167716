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
and head [num_pages, num_kv_heads]); or, as the engine stores them, a `QuantizedPages` pool whose
every written token carries its own scale per K/V head (set when it is written, so no scale is ever
stale or shared with tokens written later).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class QuantizedPages:
    """An int8 / float8 pool with one float32 scale per token and K/V head.

    pages:  [(L,) num_pages, page_size, 2 * num_kv_heads, head_dim] int8, or uint8 holding the bits of
            float8 values (`value_dtype`)
    scales: [(L,) num_pages, page_size, 2 * num_kv_heads] float32, the pages' layout without head_dim
    A token's K (or V) of one head is stored as round(x / s) with s = max|x| / the dtype's largest value:
    4 bytes of scale per head_dim bytes of values (6 % at head_dim 64, 1.6 % at 256).

    Float8 values are stored as their bit patterns because XLA:CPU has no float8 scatter or gather: it
    converts the whole pool to float16 and back around each one (0.8 s per layer write at 2M tokens).
    A bitcast is free on every backend.
    """

    pages: jax.Array
    scales: jax.Array
    value_dtype: str = "int8"

    @property
    def shape(self):
        return self.pages.shape

    @property
    def dtype(self):
        return jnp.dtype(self.value_dtype)

    def load(self, at) -> jax.Array:
        """The float32 values at an index of the pages (scales applied)."""
        values = self.pages[at]
        if values.dtype != self.dtype:
            values = jax.lax.bitcast_convert_type(values, self.dtype)
        return values.astype(jnp.float32) * self.scales[at][..., None]

    def store(self, at, values: jax.Array, scales: jax.Array) -> "QuantizedPages":
        """Writes values (in `dtype`) and their scales at an index; out-of-range indices are dropped."""
        if self.pages.dtype != self.dtype:
            values = jax.lax.bitcast_convert_type(values, self.pages.dtype)
        return QuantizedPages(self.pages.at[at].set(values, mode="drop"),
                              self.scales.at[at].set(scales, mode="drop"), self.value_dtype)

    @property
    def nbytes(self) -> int:
        return self.pages.nbytes + self.scales.nbytes


jax.tree_util.register_dataclass(QuantizedPages, data_fields=["pages", "scales"], meta_fields=["value_dtype"])


def allocate_pages(shape, dtype, sharding=None):
    """A zeroed pool [L, num_pages, page_size, 2 * Hkv, D]: a plain array, or QuantizedPages for int8 /
    float8 (the scales take the pages' sharding minus head_dim, a spec of one fewer axis)."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize != 1:
        return jnp.zeros(shape, dtype, device=sharding)
    scale_sharding = None if sharding is None else sharding.update(spec=sharding.spec[:-1])
    storage = dtype if jnp.issubdtype(dtype, jnp.integer) else jnp.uint8
    return QuantizedPages(jnp.zeros(shape, storage, device=sharding),
                          jnp.zeros(shape[:-1], jnp.float32, device=scale_sharding), dtype.name)


def _per_token_quantize(new: jax.Array, dtype):
    """new [T, 2H, D] -> (values in `dtype`, scales [T, 2H] f32): each row's max |x| maps to the top."""
    x = new.astype(jnp.float32)
    top = float(jnp.iinfo(dtype).max) if jnp.issubdtype(dtype, jnp.integer) else float(jnp.finfo(dtype).max)
    scale = jnp.max(jnp.abs(x), axis=-1) / top
    scale = jnp.where(scale > 0, scale, 1.0)
    return _to_grid(x / scale[..., None], dtype).astype(dtype), scale

# Keys are processed this many tokens at a time; a block spans whole pages.
_KEY_BLOCK_TOKENS = 128
# Query rows per tile, and per sub-tile of rows that gather their own keys (see ragged_paged_attention).
_Q_TILE = 64
_ROW_SUBTILE = 4


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
    if isinstance(kv_pages, QuantizedPages):
        values, scales = _per_token_quantize(new, kv_pages.dtype)
        page, offset = slot // page_size, slot % page_size
        at = (page, offset) if layer is None else (layer, page, offset)
        return kv_pages.store(at, values, scales)
    if jnp.issubdtype(kv_pages.dtype, jnp.integer) or kv_pages.dtype.itemsize == 1:
        new = _quantize(new, slot // page_size, kv_pages.dtype, k_scale, v_scale)
    new = new.astype(kv_pages.dtype)
    page, offset = slot // page_size, slot % page_size
    at = (page, offset) if layer is None else (layer, page, offset)
    if kv_pages.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        # XLA:CPU scatters bfloat16 by converting the whole pool to float32 and back (~230 ms per layer
        # for a 30-layer, 16k-token pool); as 16-bit integers it halves that (the bit-casts are copies
        # there). With the ggml extension built, cpu.write_kv writes in place instead.
        bits = jax.lax.bitcast_convert_type(kv_pages, jnp.uint16)
        bits = bits.at[at].set(jax.lax.bitcast_convert_type(new, jnp.uint16), mode="drop")
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    return kv_pages.at[at].set(new, mode="drop")


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
    return _to_grid(new.astype(jnp.float32) / scale, dtype)


def _to_grid(x, dtype):
    """Scaled values -> the nearest values `dtype` holds (rounded for integers), clipped to its range."""
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(x), info.min, info.max)
    info = jnp.finfo(dtype)
    return jnp.clip(x, float(info.min), float(info.max))


def ragged_paged_attention(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array, page_table: jax.Array,
                           cu_q_lens: jax.Array, num_seqs: jax.Array, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale=None, v_scale=None, layer=None) -> jax.Array:
    """Attention of each ragged row over its own sequence's pages. Returns [T, num_q_heads, head_dim].

    Rows are processed in tiles of up to _Q_TILE rows, and only tiles holding live rows are visited.
    A tile whose rows all belong to one sequence (the bulk of a prefill chunk) gathers each key block
    once and shares it across its rows; a tile spanning several sequences (decode rows, boundaries)
    gathers keys per row. Either way the key loop (online softmax over blocks of whole pages) stops at
    the tile's longest context, so work follows the real lengths, not the padded shapes.
    """
    num_rows, num_q_heads, head_dim = q.shape
    _, page_size, two_h, _ = _layer_view(kv_pages, layer)
    num_kv_heads = two_h // 2
    group = num_q_heads // num_kv_heads
    max_seqs, max_pages = page_table.shape
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())

    # Entries of cu_q_lens past num_seqs are padding of any value (zeros, say); searchsorted needs a
    # sorted array, so they are replaced by the live row count.
    cu_q_lens = jnp.asarray(cu_q_lens, jnp.int32)
    cu_q_lens = jnp.where(jnp.arange(max_seqs + 1) <= num_seqs, cu_q_lens, cu_q_lens[num_seqs])

    tile = min(_Q_TILE, num_rows)
    num_tiles = -(-num_rows // tile)
    padded_rows = num_tiles * tile

    # Which sequence each row belongs to, and its absolute position.
    rows = jnp.arange(padded_rows, dtype=jnp.int32)
    num_live_rows = cu_q_lens[num_seqs]
    seq_of_row = jnp.clip(jnp.searchsorted(cu_q_lens[1:], rows, side="right"), 0, max_seqs - 1)
    live_row = rows < num_live_rows
    live_seq = jnp.arange(max_seqs) < num_seqs
    kv_lens = jnp.where(live_seq, kv_lens, 0)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    row_kv_len = jnp.where(live_row, kv_lens[seq_of_row], 0)
    q_pos = row_kv_len - q_lens[seq_of_row] + (rows - cu_q_lens[seq_of_row])

    pages_per_block = max(1, _KEY_BLOCK_TOKENS // page_size)
    num_blocks = max(1, -(-max_pages // pages_per_block))
    page_table = jnp.where(live_seq[:, None], page_table, 0)  # padding sequences read page 0 only
    pad = num_blocks * pages_per_block - max_pages
    if pad:
        page_table = jnp.pad(page_table, ((0, 0), (0, pad)))
    block_tokens = pages_per_block * page_size

    qg = q.astype(jnp.float32).reshape(num_rows, num_kv_heads, group, head_dim) * sm_scale
    if padded_rows != num_rows:
        qg = jnp.pad(qg, ((0, padded_rows - num_rows), (0, 0), (0, 0), (0, 0)))
    per_token = isinstance(kv_pages, QuantizedPages)
    scaled = not per_token and (kv_pages.dtype.itemsize == 1 or k_scale is not None or v_scale is not None)

    def load_block(pages):
        """pages [..., ppb] -> k, v [..., K, H, D] float32 (dequantized)."""
        if per_token:
            at = pages if layer is None else (layer, pages)
            kv = kv_pages.load(at)
        else:
            kv = kv_pages[pages] if layer is None else kv_pages[layer, pages]
        kv = kv.reshape(pages.shape[:-1] + (block_tokens, num_kv_heads, 2, head_dim)).astype(jnp.float32)
        k, v = kv[..., 0, :], kv[..., 1, :]
        if scaled:
            tok_pages = jnp.repeat(pages, page_size, axis=-1)
            k = k * _scales_for(k_scale, tok_pages, num_kv_heads)[..., None]
            v = v * _scales_for(v_scale, tok_pages, num_kv_heads)[..., None]
        return k, v

    def attend(q_t, pos_t, kv_len_t, row_pages_t, shared: bool):
        """Online softmax of one tile. q_t [B, H, G, D]; pos_t, kv_len_t [B]; row_pages_t [B, P] (or
        [P] when every row of the tile shares one sequence)."""
        spec = ("qhgd,khd->qhgk", "qhgk,khd->qhgd") if shared else ("qhgd,qkhd->qhgk", "qhgk,qkhd->qhgd")
        # Keys a tile needs: up to its last query position (causal), within its sequences' lengths.
        needed = jnp.max(jnp.where(kv_len_t > 0, jnp.minimum(pos_t + 1, kv_len_t), 0))
        first = 0
        if sliding_window is not None:  # keys older than every row's window are skipped whole
            oldest = jnp.min(jnp.where(kv_len_t > 0, pos_t, jnp.iinfo(jnp.int32).max)) - sliding_window + 1
            first = jnp.clip(oldest, 0, None) // block_tokens

        def body(b, carry):
            m, l, acc = carry
            pages = jax.lax.dynamic_slice_in_dim(row_pages_t, b * pages_per_block, pages_per_block, axis=-1)
            k, v = load_block(pages)
            k_pos = b * block_tokens + jnp.arange(block_tokens)
            in_seq = k_pos[None, :] < kv_len_t[:, None]  # [B, K]
            # Slots past a sequence's length (unwritten, stale or another request's) may hold anything,
            # NaN included, and 0 * NaN = NaN: zero them rather than rely on p == 0.
            v_ok = in_seq[0] if shared else in_seq
            v = jnp.where(v_ok[..., None, None], v, 0.0)
            s = jnp.einsum(spec[0], q_t, k)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            mask = (k_pos[None, :] <= pos_t[:, None]) & in_seq
            if sliding_window is not None:
                mask &= k_pos[None, :] > pos_t[:, None] - sliding_window
            s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum(spec[1], p, v)
            return m_new, l, acc

        b_rows = q_t.shape[0]
        init = (jnp.full((b_rows, num_kv_heads, group), -jnp.inf, jnp.float32),
                jnp.zeros((b_rows, num_kv_heads, group), jnp.float32),
                jnp.zeros((b_rows, num_kv_heads, group, head_dim), jnp.float32))
        last = jnp.minimum((needed + block_tokens - 1) // block_tokens, num_blocks)
        _, l, acc = jax.lax.fori_loop(first, last, body, init)
        return acc / jnp.where(l > 0, l, 1.0)[..., None]

    def tile_body(i, out):
        r0 = i * tile
        q_t = jax.lax.dynamic_slice_in_dim(qg, r0, tile)
        seq_t = jax.lax.dynamic_slice_in_dim(seq_of_row, r0, tile)
        live_t = jax.lax.dynamic_slice_in_dim(live_row, r0, tile)
        pos_t = jax.lax.dynamic_slice_in_dim(q_pos, r0, tile)
        kv_len_t = jax.lax.dynamic_slice_in_dim(row_kv_len, r0, tile)
        one_seq = jnp.all(live_t & (seq_t == seq_t[0]))

        def per_row():
            # Sub-tiles of rows, each bounded by its own longest context: a short decode row does not
            # pay for the longest one in the batch (the runner sorts decode rows by length).
            sub = _ROW_SUBTILE if tile % _ROW_SUBTILE == 0 else tile
            split = lambda x: x.reshape((tile // sub, sub) + x.shape[1:])
            res = jax.lax.map(lambda a: attend(*a, shared=False),
                              (split(q_t), split(pos_t), split(kv_len_t), split(page_table[seq_t])))
            return res.reshape((tile,) + res.shape[2:])

        res = jax.lax.cond(one_seq, lambda: attend(q_t, pos_t, kv_len_t, page_table[seq_t[0]], shared=True),
                           per_row)
        res = jnp.where(live_t[:, None, None, None], res, 0.0)
        return jax.lax.dynamic_update_slice_in_dim(out, res, r0, axis=0)

    if num_rows == 1:
        # Single-stream decode (the 1-token bucket): one row of one sequence, so no tile loop and no
        # choice of path; each control-flow op costs XLA:CPU tens of microseconds per layer.
        res = attend(qg, q_pos, row_kv_len, page_table[seq_of_row[0]], shared=True)
        res = jnp.where(live_row[:, None, None, None], res, 0.0)
        return res.reshape(1, num_q_heads, head_dim).astype(q.dtype)
    out = jnp.zeros((padded_rows, num_kv_heads, group, head_dim), jnp.float32)
    out = jax.lax.fori_loop(0, (num_live_rows + tile - 1) // tile, tile_body, out)
    return out[:num_rows].reshape(num_rows, num_q_heads, head_dim).astype(q.dtype)
