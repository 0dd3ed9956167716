"""Ragged paged attention as a Pallas GPU (Triton) kernel.

Same contract as reference.py (read its docstring for the pool layout and the ragged batch).

Work decomposition (the wrapper computes it in jnp, the kernel only looks it up):
  * Work items are (sequence, block of `block_q` consecutive new rows of that sequence): a prefill
    chunk of n rows is cdiv(n, block_q) items, a decode row is one item. There are at most
    cdiv(T, block_q) + S items; the grid is sized by that bound and spare programs exit at once.
  * Query heads are regrouped per KV head: q [T, Hq, D] -> [Hkv, T * group_p, D] (group padded to
    a power of two for Triton), so an item of one KV head is one [block_q * group_p, D] matrix and
    each K/V key is loaded once for all query heads that share it.
  * grid = (items, Hkv, num_kv_splits). A program walks its share of the item's visible KV blocks
    (flash attention; keys gathered page by page through the page table in blocks of `block_k`
    keys). With more than one split the KV length is cut into num_kv_splits contiguous ranges, each
    writes an unnormalized-free (normalized) partial output and its log-sum-exp, and the wrapper
    merges them: this is the decode path, where one row per sequence would otherwise leave most of
    the GPU idle. The number of splits is static (chosen from T: small T -> decode-like batch).
  * Masked loads: keys past the visible range are not read at all (mask on the gather), so unused
    page-table entries and out-of-range pages are never touched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention.tpu import kernel_scales

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def work_items(cu_q_lens, num_seqs, num_items: int, block_q: int):
    """Item -> (sequence, first row); sequence -1 for spare items. Sorted cu_q_lens as a bonus."""
    cu = jnp.asarray(cu_q_lens, jnp.int32)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    live = jnp.arange(cu.shape[0]) <= num_seqs
    cu = jnp.where(live, cu, cu[num_seqs])  # padding entries may hold anything
    q_lens = cu[1:] - cu[:-1]
    per_seq = (q_lens + block_q - 1) // block_q
    cum = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_seq).astype(jnp.int32)])
    items = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cum[1:], items, side="right"), 0, q_lens.shape[0] - 1).astype(jnp.int32)
    first_row = cu[seq] + (items - cum[seq]) * block_q
    valid = items < cum[-1]
    return jnp.where(valid, seq, -1), jnp.where(valid, first_row, 0), cu


def _kernel(*refs, block_q: int, group: int, block_k: int, page_size: int, max_pages: int,
            num_pages: int, num_kv_heads: int, num_splits: int, sm_scale: float, sliding_window,
            soft_cap, scaled: bool, k_per_page: bool, v_per_page: bool):
    """One (item, kv head, kv split).

    Refs: kv_lens [S], page_table [S * P], cu_q_lens [S + 1] (sorted), item_seq [W], item_row [W],
      layer [1], (k_scale, v_scale flat if scaled), q [Hkv, T_pad * group, D],
      kv [num_layers * num_pages * page_size, 2 * Hkv, D] (the pool viewed as key slots);
      outputs o [splits, Hkv, T_pad * group, D], lse [splits, Hkv, T_pad * group].
    """
    if scaled:
        (kv_lens_ref, page_table_ref, cu_ref, item_seq_ref, item_row_ref, layer_ref, k_scale_ref,
         v_scale_ref, q_ref, kv_ref, o_ref, lse_ref) = refs
    else:
        (kv_lens_ref, page_table_ref, cu_ref, item_seq_ref, item_row_ref, layer_ref,
         q_ref, kv_ref, o_ref, lse_ref) = refs
    item, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_rows = block_q * group
    s = item_seq_ref[item]

    @pl.when(s >= 0)
    def _():
        row0 = item_row_ref[item]
        q_start, q_end = cu_ref[s], cu_ref[s + 1]
        kv_len = kv_lens_ref[s]
        ctx = kv_len - (q_end - q_start)
        row_hi = jnp.minimum(q_end, row0 + block_q)
        kv_hi = ctx + (row_hi - q_start)  # causal bound of the item's last row
        blk_hi = (kv_hi + block_k - 1) // block_k
        if sliding_window is None:
            blk_lo = jnp.int32(0)
        else:
            blk_lo = jnp.maximum(ctx + (row0 - q_start) - sliding_window + 1, 0) // block_k
        per_split = (blk_hi - blk_lo + num_splits - 1) // num_splits
        my_lo = blk_lo + split * per_split
        my_hi = jnp.minimum(my_lo + per_split, blk_hi)

        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (num_rows,), 0) // group
        q_pos = ctx + rows - q_start
        row_live = rows < q_end
        q = q_ref[h, pl.ds(row0 * group, num_rows), :]
        slot_base = layer_ref[0] * (num_pages * page_size)
        head_dim = q.shape[-1]
        dims = jax.lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
        zero = jnp.zeros((), kv_ref.dtype)  # masked-off keys read as 0 (Triton cannot cast i32 to fp8)

        # f32 activations get IEEE f32 dots (Triton's default for f32 is TF32).
        precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

        def body(blk, carry):
            m, l, acc = carry
            k_pos = blk * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            key_ok = k_pos < kv_hi
            page_idx = jnp.minimum(k_pos // page_size, max_pages - 1)
            page = page_table_ref[s * max_pages + page_idx]
            page = jnp.clip(page, 0, num_pages - 1)
            slot = slot_base + page * page_size + k_pos % page_size
            # A gather of block_k keys (all-array indices: a [block_k, D] pointer tensor in Triton).
            ld_mask = jnp.broadcast_to(key_ok[:, None], (block_k, head_dim))
            k = plgpu.load(kv_ref.at[slot[:, None], 2 * h, dims], mask=ld_mask, other=zero)
            v = plgpu.load(kv_ref.at[slot[:, None], 2 * h + 1, dims], mask=ld_mask, other=zero)
            sc = jax.lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32, precision=precision)
            if scaled:
                sc = sc * _key_scales(k_scale_ref, k_per_page, page, h, num_kv_heads)
            sc = sc * sm_scale
            if soft_cap is not None:
                sc = soft_cap * jnp.tanh(sc / soft_cap)
            mask = row_live[:, None] & (k_pos[None, :] <= q_pos[:, None]) & key_ok[None, :]
            if sliding_window is not None:
                mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
            sc = jnp.where(mask, sc, _MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            p = jnp.where(mask, jnp.exp(sc - m_new[:, None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=1)
            if scaled:
                p = p * _key_scales(v_scale_ref, v_per_page, page, h, num_kv_heads)
            pv = jax.lax.dot_general(p.astype(q.dtype), v.astype(q.dtype), (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32, precision=precision)
            return m_new, l, acc * corr[:, None] + pv

        init = (jnp.full((num_rows,), _MASK_VALUE, jnp.float32), jnp.zeros((num_rows,), jnp.float32),
                jnp.zeros((num_rows, q.shape[-1]), jnp.float32))
        m, l, acc = jax.lax.fori_loop(my_lo, jnp.maximum(my_hi, my_lo), body, init)
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        row_ok = rows < row_hi  # rows past the item belong to another item (or are padding)
        plgpu.store(o_ref.at[split, h, pl.ds(row0 * group, num_rows), :], out.astype(o_ref.dtype),
                    mask=jnp.broadcast_to(row_ok[:, None], out.shape))
        plgpu.store(lse_ref.at[split, h, pl.ds(row0 * group, num_rows)], lse, mask=row_ok)


def _key_scales(scale_ref, per_page, page, h, num_kv_heads):
    """Per-key dequantization scale [1, block_k] (gathered by page) or a scalar (per head)."""
    if per_page:
        return scale_ref[page * num_kv_heads + h][None, :]
    return scale_ref[h]


def default_num_kv_splits(num_rows: int, num_kv_heads: int, block_q: int, max_keys: int, block_k: int):
    """Static split count: enough programs to fill a big GPU when the batch is decode-sized."""
    programs = pl.cdiv(num_rows, block_q) * num_kv_heads
    splits = max(1, 512 // max(programs, 1))
    splits = min(splits, max(1, max_keys // (4 * block_k)), 16)  # >= 4 blocks per split
    while splits > 1 and splits * num_rows > 16384:  # partial outputs stay small
        splits //= 2
    return pl.next_power_of_2(splits) if splits > 1 else 1


def ragged_paged_attention(q, kv_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale=None, v_scale=None, layer=None, block_q: int | None = None,
                           block_k: int | None = None, num_kv_splits: int | None = None,
                           num_warps: int | None = None, num_stages: int = 2, interpret=False):
    """Pallas-Triton ragged paged attention; arguments and result as in the reference.

    q: [T, Hq, D]; kv_pages: [num_pages, page_size, 2 * Hkv, D] (or [L, ...] with `layer`);
    kv_lens [S], page_table [S, P], cu_q_lens [S + 1], num_seqs [1] or scalar. Returns [T, Hq, D].
    Tuning (None: chosen from the shapes): block_q rows per item, block_k keys per inner step,
    num_kv_splits, num_warps, num_stages.
    """
    num_rows, num_q_heads, head_dim = q.shape
    pool_shape = kv_pages.shape if layer is None else kv_pages.shape[1:]
    num_pages, page_size, two_h, _ = pool_shape
    num_kv_heads = two_h // 2
    group = num_q_heads // num_kv_heads
    group_p = pl.next_power_of_2(group)
    max_seqs, max_pages = page_table.shape
    if block_q is None:
        # A program multiplies [block_q * group_p, D] query rows. A decode-sized batch (no more rows
        # than sequences) brings `group` live rows per sequence, so it gets the 16 rows a tensor-core
        # dot needs and no more (bigger tiles only burn registers on dead rows: 249 vs 96 per thread
        # at Llama-8B heads, see pallas_kernels/aot.py); prefill gets FlashAttention-sized tiles.
        rows = 16 if num_rows <= max_seqs else 128 if head_dim <= 128 else 64
        block_q = max(1, rows // group_p)
    if block_q * group_p < 16:  # Triton's dot wants >= 16 rows
        block_q = 16 // group_p
    if num_warps is None:
        num_warps = 8 if block_q * group_p >= 128 else 4
    if block_k is None:
        block_k = max(page_size, 64)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(num_rows, num_kv_heads, block_q, max_pages * page_size,
                                              block_k)
    num_items = pl.cdiv(num_rows, block_q) + max_seqs
    item_seq, item_row, cu = work_items(cu_q_lens, num_seqs, num_items, block_q)

    padded_rows = num_rows + block_q  # an item's [row0, row0 + block_q) window is always in bounds
    qg = q.reshape(num_rows, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, padded_rows - num_rows), (0, 0), (0, group_p - group), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded_rows * group_p, head_dim)
    # The pool as a flat list of key slots: a free reshape (no copy), all layers included.
    kv_flat = kv_pages.reshape(-1, two_h, head_dim)

    scales, k_per_page, v_per_page = kernel_scales(kv_pages.dtype, k_scale, v_scale, num_pages, num_kv_heads)
    scaled = bool(scales)
    meta = [jnp.asarray(kv_lens, jnp.int32), jnp.asarray(page_table, jnp.int32).reshape(-1), cu,
            item_seq, item_row, jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1), *scales]

    kernel = functools.partial(
        _kernel, block_q=block_q, group=group_p, block_k=block_k, page_size=page_size,
        max_pages=max_pages, num_pages=num_pages, num_kv_heads=num_kv_heads, num_splits=num_kv_splits,
        sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap, scaled=scaled,
        k_per_page=k_per_page, v_per_page=v_per_page)
    out_dtype = q.dtype if num_kv_splits == 1 else jnp.float32
    o, lse = pl.pallas_call(
        kernel,
        grid=(num_items, num_kv_heads, num_kv_splits),
        out_shape=[jax.ShapeDtypeStruct((num_kv_splits,) + qg.shape, out_dtype),
                   jax.ShapeDtypeStruct((num_kv_splits,) + qg.shape[:2], jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(*meta, qg, kv_flat)

    if num_kv_splits == 1:
        out = o[0].astype(jnp.float32)
    else:  # log-sum-exp merge of the KV splits
        lse_max = jnp.max(lse, axis=0)
        w = jnp.exp(lse - jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)[None])
        w = jnp.where(jnp.isfinite(lse), w, 0.0)
        out = jnp.sum(w[..., None] * o, axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[..., None]
    out = out.reshape(num_kv_heads, padded_rows, group_p, head_dim)[:, :num_rows, :group]
    out = out.transpose(1, 0, 2, 3).reshape(num_rows, num_q_heads, head_dim)
    # Rows no item owns (padding) were never written: zero them (as the reference does).
    live = jnp.arange(num_rows) < cu[jnp.asarray(num_seqs, jnp.int32).reshape(())]
    return jnp.where(live[:, None, None], out, 0).astype(q.dtype)
