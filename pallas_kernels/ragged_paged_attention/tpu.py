"""Ragged paged attention as a Mosaic TPU Pallas kernel.

Same contract as reference.py (read its docstring for the pool layout and the ragged batch).

Work decomposition:
  * Query heads are regrouped per KV head in the wrapper: q [T, Hq, D] -> [Hkv, T * group, D], row
    t * group + g is token t, query head h * group + g. A tile of `num_queries_per_block` (bq) tokens
    of one KV head is then a plain 2-D [bq * group, D] matrix, so GQA costs one matmul per KV head
    and each K/V page is read once for all `group` query heads that share it.
  * grid = (cdiv(T, bq),), all KV heads in one step. A tile is an aligned slice of the flat token
    batch, so it may span several sequences (many decode rows, or the tail of one prefill and
    the head of the next). The kernel loops over the sequences that own rows of its tile; rows of
    other sequences are masked out of each sequence's softmax update. Tile -> first/last sequence
    is computed once in the wrapper (searchsorted) and scalar-prefetched with kv_lens, cu_q_lens and
    the page table, so the kernel never searches.
  * For each (sequence, tile) only the KV blocks the tile can see are fetched: causality bounds the
    last block by the tile's last row, a sliding window bounds the first block by its first row.
  * KV blocks are `pages_per_block` whole pages, DMA'd straight from the HBM pool by page-table
    lookup into a double buffer: block j+1 (or the next sequence's first block) is in flight while
    block j is in the MXU. Pages past the sequence's length are never fetched (so no garbage or
    out-of-range page is read); stale buffer contents are masked out of both K and V.
  * K/V of one head is read from the VMEM block as a strided sublane load: the block is viewed as
    [ppb * page_size * 2 * Hkv, D] rows, K of head h at rows 2h, 2h + 2Hkv, ... and V one row
    further (slicing the head axis of the 4-D block would need a relayout). Mosaic strides 32-bit
    rows only, so packed pools (bf16, int8, fp8) are loaded as uint32 words that hold 2 or 4
    consecutive rows and split in registers (unpack_rows). The row view needs 2 * Hkv to fill whole
    (8 * packing)-row tiles or divide one; other head counts, and interpret mode (the TPU interpreter
    has neither ref reshape nor ref bitcast), index the head axis directly.
  * Online softmax in f32 scratch (m, l, acc) that persists across all sequences of the tile; a row
    only ever meets its own sequence's keys, so its state is the one-sequence flash-attention state.

Quantized pages (int8 / float8) are multiplied in their storage values cast to the activation dtype;
the scales are applied outside the matmuls (K scale on the scores, V scale on the probabilities), one
scale per key, which is exact because a scale is constant over a page's head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# A finite "minus infinity": exp(MASK - m) underflows to 0 but MASK - MASK is not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def tpu_interpret_params():
    """Interpret mode that simulates the TPU (DMAs, semaphores, NaN-filled uninitialized memory).

    Falls back to the generic `interpret=True` on jax versions without `pltpu.InterpretParams`.
    """
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 1


def normalize_scale(scale, num_pages: int, num_kv_heads: int):
    """Scale -> (flat f32 array, per_page). None/scalar/[H] -> [H]; [num_pages, H] -> [num_pages*H]."""
    scale = jnp.asarray(1.0 if scale is None else scale, jnp.float32)
    if scale.ndim == 2:
        if scale.shape != (num_pages, num_kv_heads):
            scale = jnp.broadcast_to(scale, (num_pages, num_kv_heads))
        return scale.reshape(-1), True
    return jnp.broadcast_to(scale, (num_kv_heads,)), False


def kernel_scales(kv_dtype, k_scale, v_scale, num_pages: int, num_kv_heads: int):
    """(flat [k, v] scale arrays, k_per_page, v_per_page); no arrays for an unscaled float pool."""
    if not (is_quantized(kv_dtype) or k_scale is not None or v_scale is not None):
        return [], False, False
    ks, k_per_page = normalize_scale(k_scale, num_pages, num_kv_heads)
    vs, v_per_page = normalize_scale(v_scale, num_pages, num_kv_heads)
    return [ks, vs], k_per_page, v_per_page


def unpack_rows(words, dtype, lane: int):
    """Row `lane` of the rows of `dtype` packed in uint32 `words` (a sublane-packed TPU buffer).

    A TPU buffer of a 16- or 8-bit dtype packs 2 or 4 consecutive rows into each 32-bit word, the
    first row in the lowest bits. bf16 is widened to f32 exactly by moving its bits to the top half.
    """
    dtype = jnp.dtype(dtype)
    bits = 8 * dtype.itemsize
    if dtype == jnp.bfloat16:
        f32_bits = words << 16 if lane == 0 else words & jnp.uint32(0xFFFF0000)
        return jax.lax.bitcast_convert_type(f32_bits, jnp.float32).astype(dtype)
    if bits != 8:
        raise ValueError(f"no packed loads for {dtype}")
    return jax.lax.bitcast_convert_type((words >> (lane * bits)).astype(jnp.uint8), dtype)


def tile_sequence_bounds(cu_q_lens, num_seqs, num_tiles: int, bq: int):
    """First and last (inclusive) live sequence owning rows of each bq-row tile; last < first if none.

    Entries of cu_q_lens past num_seqs are padding of any value, so they are replaced by the live
    row count first (searchsorted needs a sorted array).
    """
    cu = jnp.asarray(cu_q_lens, jnp.int32)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    total = cu[num_seqs]
    cu = jnp.where(jnp.arange(cu.shape[0]) <= num_seqs, cu, total)
    first_row = jnp.arange(num_tiles, dtype=jnp.int32) * bq
    last_row = jnp.minimum(first_row + bq, total) - 1
    lo = jnp.searchsorted(cu[1:], first_row, side="right").astype(jnp.int32)
    hi = jnp.searchsorted(cu[1:], last_row, side="right").astype(jnp.int32)
    empty = first_row >= total
    return jnp.where(empty, 1, lo), jnp.where(empty, 0, hi), cu


def _kernel(*refs, bq: int, group: int, ppb: int, page_size: int, max_pages: int, num_pages: int,
            num_kv_heads: int, sm_scale: float, sliding_window, soft_cap, has_layer: bool,
            scaled: bool, k_per_page: bool, v_per_page: bool, row_loads: bool):
    """One row tile: loop over the tile's sequences and their visible KV blocks, all KV heads.

    Scalar prefetch (SMEM): kv_lens [S], page_table [S * P], cu_q_lens [S + 1] (sorted), tile_lo,
      tile_hi [num_tiles], layer [1], then k_scale, v_scale (flat, see normalize_scale) if scaled.
    q_ref / o_ref: [Hkv, bq * group, D] (VMEM blocks); kv_hbm: the whole pool (HBM, DMA'd by hand).
    Scratch: kv_buf [2, ppb, page_size, 2 * Hkv, D], sems DMA[2], m/l [Hkv, M, 1], acc [Hkv, M, D].
    """
    if scaled:
        (kv_lens_ref, page_table_ref, cu_ref, tile_lo_ref, tile_hi_ref, layer_ref, k_scale_ref,
         v_scale_ref, q_ref, kv_hbm, o_ref, kv_buf, sems, m_ref, l_ref, acc_ref) = refs
    else:
        (kv_lens_ref, page_table_ref, cu_ref, tile_lo_ref, tile_hi_ref, layer_ref,
         q_ref, kv_hbm, o_ref, kv_buf, sems, m_ref, l_ref, acc_ref) = refs
        k_scale_ref = v_scale_ref = None
    tile = pl.program_id(0)
    block_tokens = ppb * page_size
    num_rows = bq * group
    row0 = tile * bq
    s_first = tile_lo_ref[tile]
    s_last = tile_hi_ref[tile]

    m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def geometry(s):
        """Rows of sequence s inside this tile and the KV blocks they can see."""
        q_start, q_end = cu_ref[s], cu_ref[s + 1]
        kv_len = kv_lens_ref[s]
        ctx = kv_len - (q_end - q_start)  # cached tokens before the new rows
        r_lo = jnp.maximum(q_start, row0)
        r_hi = jnp.minimum(q_end, row0 + bq)
        nonempty = r_hi > r_lo
        kv_hi = ctx + (r_hi - q_start)  # causal: the tile's last row sees keys [0, kv_hi)
        blk_hi = (kv_hi + block_tokens - 1) // block_tokens
        if sliding_window is None:
            blk_lo = jnp.int32(0)
        else:
            blk_lo = jnp.maximum(ctx + (r_lo - q_start) - sliding_window + 1, 0) // block_tokens
        blk_hi = jnp.where(nonempty, blk_hi, blk_lo)
        return q_start, q_end, kv_len, ctx, kv_hi, blk_lo, blk_hi, nonempty

    def block_copies(s, blk, slot, kv_hi):
        """The page DMAs of KV block blk of sequence s, each with its 'page is needed' predicate."""
        copies = []
        for j in range(ppb):
            page_idx = blk * ppb + j
            needed = page_idx * page_size < kv_hi
            page = page_table_ref[s * max_pages + jnp.minimum(page_idx, max_pages - 1)]
            page = jnp.clip(page, 0, num_pages - 1)  # never an out-of-range DMA, whatever the table says
            src = kv_hbm.at[layer_ref[0], page] if has_layer else kv_hbm.at[page]
            copies.append((needed, pltpu.make_async_copy(src, kv_buf.at[slot, j], sems.at[slot])))
        return copies

    def start(s, blk, slot, kv_hi):
        for needed, copy in block_copies(s, blk, slot, kv_hi):
            pl.when(needed)(copy.start)

    def wait(s, blk, slot, kv_hi):
        for needed, copy in block_copies(s, blk, slot, kv_hi):
            pl.when(needed)(copy.wait)

    def key_scales(scale_ref, per_page, s, blk, head):
        """Per-key scale row [1, block_tokens] (pages differ along the block) or a scalar."""
        if not per_page:
            return scale_ref[head]
        local_page = jax.lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1) // page_size
        row = jnp.zeros((1, block_tokens), jnp.float32)
        for j in range(ppb):
            page_idx = jnp.minimum(blk * ppb + j, max_pages - 1)
            page = jnp.clip(page_table_ref[s * max_pages + page_idx], 0, num_pages - 1)
            row = jnp.where(local_page == j, scale_ref[page * num_kv_heads + head], row)
        return row

    def load_head(slot, h):
        """K and V rows [block_tokens, D] of KV head h from the buffer (see the module docstring)."""
        if not row_loads:
            return (kv_buf[slot, :, :, 2 * h, :].reshape(block_tokens, -1),
                    kv_buf[slot, :, :, 2 * h + 1, :].reshape(block_tokens, -1))
        two_h = 2 * num_kv_heads
        rows = kv_buf.at[slot].reshape(block_tokens * two_h, kv_buf.shape[-1])
        packing = 4 // kv_buf.dtype.itemsize
        if packing == 1:
            return (rows[pl.ds(2 * h, block_tokens, stride=two_h), :],
                    rows[pl.ds(2 * h + 1, block_tokens, stride=two_h), :])
        words = rows.bitcast(jnp.uint32)[pl.ds(2 * h // packing, block_tokens, stride=two_h // packing), :]
        lane = 2 * h % packing
        return (unpack_rows(words, kv_buf.dtype, lane), unpack_rows(words, kv_buf.dtype, lane + 1))

    def compute(s, blk, slot, q_start, q_end, ctx, kv_hi):
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0) // group
        q_pos = ctx + rows - q_start
        k_pos = blk * block_tokens + jax.lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)
        mask = (rows >= q_start) & (rows < q_end) & (k_pos <= q_pos)
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        key_valid = jax.lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0) + blk * block_tokens < kv_hi
        # f32 activations get true f32 matmuls (not single-pass bf16): the f32 path is the exact one.
        precision = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
        for h in range(num_kv_heads):
            q = q_ref[h]  # [M, D]
            k, v = load_head(slot, h)  # [block_tokens, D] each
            # Unfetched pages hold stale (possibly NaN) data: zero them so 0 * NaN cannot leak in.
            k = jnp.where(key_valid, k.astype(q.dtype), 0)
            v = jnp.where(key_valid, v.astype(q.dtype), 0)
            sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                     precision=precision)
            if scaled:
                sc = sc * key_scales(k_scale_ref, k_per_page, s, blk, h)
            sc = sc * sm_scale
            if soft_cap is not None:
                sc = soft_cap * jnp.tanh(sc / soft_cap)
            sc = jnp.where(mask, sc, _MASK_VALUE)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(sc - m_new), 0.0)
            corr = jnp.exp(m_prev - m_new)
            l_ref[h] = l_ref[h] * corr + jnp.sum(p, axis=1, keepdims=True)
            if scaled:
                p = p * key_scales(v_scale_ref, v_per_page, s, blk, h)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32, precision=precision)
            acc_ref[h] = acc_ref[h] * corr + pv
            m_ref[h] = m_new

    def seq_body(s, carry):
        slot, fetched = carry
        q_start, q_end, kv_len, ctx, kv_hi, blk_lo, blk_hi, nonempty = geometry(s)

        @pl.when(jnp.logical_and(fetched == 0, nonempty))
        def _():
            start(s, blk_lo, slot, kv_hi)

        nxt = s + 1
        nxt_geo = geometry(jnp.minimum(nxt, s_last))
        nxt_ok = jnp.logical_and(nxt <= s_last, nxt_geo[-1])

        def blk_body(blk, slot):
            in_seq = blk + 1 < blk_hi

            @pl.when(in_seq)
            def _():
                start(s, blk + 1, 1 - slot, kv_hi)

            @pl.when(jnp.logical_and(jnp.logical_not(in_seq), nxt_ok))
            def _():
                start(nxt, nxt_geo[5], 1 - slot, nxt_geo[4])

            wait(s, blk, slot, kv_hi)
            compute(s, blk, slot, q_start, q_end, ctx, kv_hi)
            return 1 - slot

        slot = jax.lax.fori_loop(blk_lo, blk_hi, blk_body, slot)
        return slot, jnp.logical_and(nonempty, nxt_ok).astype(jnp.int32)

    jax.lax.fori_loop(s_first, s_last + 1, seq_body, (jnp.int32(0), jnp.int32(0)))

    l = l_ref[...]
    out = acc_ref[...] / jnp.where(l > 0, l, 1.0)
    o_ref[...] = out.astype(o_ref.dtype)  # rows of no live sequence have l == 0, acc == 0 -> zeros


def ragged_paged_attention(q, kv_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale=None, v_scale=None, layer=None, num_queries_per_block: int | None = None,
                           pages_per_block: int | None = None, interpret=False):
    """Mosaic TPU ragged paged attention; arguments and result as in reference.ragged_paged_attention.

    q: [T, Hq, D]; kv_pages: [num_pages, page_size, 2 * Hkv, D] (or [L, ...] with `layer`);
    kv_lens [S], page_table [S, P], cu_q_lens [S + 1], num_seqs [1] or scalar. Returns [T, Hq, D].
    Tuning: num_queries_per_block (bq, tokens per tile), pages_per_block (pages per DMA'd KV block).
    interpret: False, True (TPU interpret mode, see tpu_interpret_params) or an InterpretParams.
    """
    num_rows, num_q_heads, head_dim = q.shape
    pool_shape = kv_pages.shape if layer is None else kv_pages.shape[1:]
    num_pages, page_size, two_h, _ = pool_shape
    num_kv_heads = two_h // 2
    group = num_q_heads // num_kv_heads
    max_seqs, max_pages = page_table.shape

    if num_queries_per_block is None:
        # Tiles of 32 rows balance decode (rows of many sequences share a tile) and prefill.
        num_queries_per_block = min(32, max(8, pl.next_power_of_2(num_rows)))
    bq = num_queries_per_block
    if pages_per_block is None:
        pages_per_block = max(1, min(max_pages, 128 // page_size))
    ppb = pages_per_block
    if interpret is True:
        interpret = tpu_interpret_params()

    num_tiles = pl.cdiv(num_rows, bq)
    padded_rows = num_tiles * bq
    tile_lo, tile_hi, cu = tile_sequence_bounds(cu_q_lens, num_seqs, num_tiles, bq)

    # [T, Hq, D] -> [Hkv, T_pad * group, D]: per KV head, its query heads' rows stacked per token.
    qg = q.reshape(num_rows, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qg = jnp.pad(qg, ((0, 0), (0, padded_rows - num_rows), (0, 0), (0, 0)))
    qg = qg.reshape(num_kv_heads, padded_rows * group, head_dim)

    # Strided row loads (see the module docstring) need 2 * Hkv rows per token to fill whole
    # (8 * packing)-row tiles or divide one, so that the 4-D block folds into rows without relayout.
    packing = 4 // jnp.dtype(kv_pages.dtype).itemsize
    words_per_token = two_h // packing
    row_loads = (not interpret and two_h % packing == 0
                 and (words_per_token in (1, 2, 4, 8) or words_per_token % 8 == 0))

    scales, k_per_page, v_per_page = kernel_scales(kv_pages.dtype, k_scale, v_scale, num_pages, num_kv_heads)
    scaled = bool(scales)
    prefetch = [jnp.asarray(kv_lens, jnp.int32), jnp.asarray(page_table, jnp.int32).reshape(-1), cu,
                tile_lo, tile_hi, jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1), *scales]

    kernel = functools.partial(
        _kernel, bq=bq, group=group, ppb=ppb, page_size=page_size, max_pages=max_pages,
        num_pages=num_pages, num_kv_heads=num_kv_heads, sm_scale=float(sm_scale),
        sliding_window=sliding_window, soft_cap=soft_cap, has_layer=layer is not None, scaled=scaled,
        k_per_page=k_per_page, v_per_page=v_per_page, row_loads=row_loads)
    block = (num_kv_heads, bq * group, head_dim)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(num_tiles,),
        in_specs=[pl.BlockSpec(block, lambda t, *_: (0, t, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(block, lambda t, *_: (0, t, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, ppb, page_size, two_h, head_dim), kv_pages.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((num_kv_heads, bq * group, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, bq * group, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, bq * group, head_dim), jnp.float32),
        ])
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(*prefetch, qg, kv_pages)
    out = out.reshape(num_kv_heads, padded_rows, group, head_dim)[:, :num_rows]
    return out.transpose(1, 0, 2, 3).reshape(num_rows, num_q_heads, head_dim)
