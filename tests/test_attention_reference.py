"""reference.py (the kernels' oracle) against a naive per-sequence dense NumPy attention.

Also home of the ragged-batch builder and the NumPy oracle that test_attention_kernels.py reuses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.ragged_paged_attention import reference

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclasses.dataclass
class Batch:
    q: np.ndarray            # [T, Hq, D]
    kv_pages: np.ndarray     # [num_pages, page_size, 2 * Hkv, D] (or [L, ...] when layer is set)
    kv_lens: np.ndarray
    page_table: np.ndarray
    cu_q_lens: np.ndarray
    num_seqs: np.ndarray
    seqs: list               # (q_len, kv_len) of the live sequences
    layer: int | None = None
    k_scale: np.ndarray | None = None
    v_scale: np.ndarray | None = None

    def args(self):
        return (jnp.asarray(self.q), jnp.asarray(self.kv_pages), jnp.asarray(self.kv_lens),
                jnp.asarray(self.page_table), jnp.asarray(self.cu_q_lens), jnp.asarray(self.num_seqs))

    def kwargs(self):
        kw = {}
        if self.layer is not None:
            kw["layer"] = self.layer
        if self.k_scale is not None:
            kw["k_scale"] = jnp.asarray(self.k_scale)
        if self.v_scale is not None:
            kw["v_scale"] = jnp.asarray(self.v_scale)
        return kw

    @property
    def num_live_rows(self):
        return int(self.cu_q_lens[int(self.num_seqs[0])])


def make_batch(seed: int, seqs, *, page_size=16, num_kv_heads=2, group=2, head_dim=64, extra_seqs=1,
               extra_rows=3, spare_pages=2, q_dtype=np.float32, kv_dtype=np.float32, scales=None,
               num_layers=None, use_last_page=True, poison=True, shape_of=None) -> Batch:
    """A random ragged batch: seqs is a list of (q_len, kv_len) with q_len <= kv_len.

    The pool holds exactly the pages the sequences need plus `spare_pages`, so the last page of the
    pool is in use when use_last_page. Unused page-table entries hold out-of-range garbage, padding
    sequences and rows hold garbage, and (float pools, poison=True) every key slot no live sequence
    owns is NaN: an implementation that reads a wrong slot, or lets a masked one leak, fails.
    scales: None, "head" ([Hkv]) or "page" ([num_pages, Hkv]) dequantization scales.
    shape_of: (max_seqs, max_q, max_kv) bounds; when given, every array shape depends on the bounds
      only (not on seqs), so jitted callees compile once for many random batches.
    """
    rng = np.random.default_rng(seed)
    need = [-(-kv // page_size) for _, kv in seqs]
    num_pages = max(1, sum(need) + spare_pages)
    max_pages = max(need + [1]) + 1
    max_seqs = len(seqs) + extra_seqs
    if shape_of is not None:
        bound_seqs, bound_q, bound_kv = shape_of
        max_pages = -(-bound_kv // page_size) + 1
        num_pages = bound_seqs * (max_pages - 1) + spare_pages
        max_seqs = bound_seqs + extra_seqs
        extra_rows = bound_seqs * bound_q + extra_rows - sum(ql for ql, _ in seqs)
    perm = rng.permutation(num_pages)
    if use_last_page and sum(need):
        # Put the pool's last page at the end of the longest sequence's page list.
        j = int(np.argmax(need))
        last_slot = sum(need[:j + 1]) - 1
        k = int(np.nonzero(perm == num_pages - 1)[0][0])
        perm[[k, last_slot]] = perm[[last_slot, k]]
    page_table = rng.integers(num_pages, 10 * num_pages + 5, (max_seqs, max_pages)).astype(np.int32)
    page_table[rng.random(page_table.shape) < 0.3] = -1
    owned = np.zeros((num_pages, page_size), bool)
    start = 0
    for i, n in enumerate(need):
        page_table[i, :n] = perm[start:start + n]
        for p in range(n):
            used = min(page_size, seqs[i][1] - p * page_size)
            owned[perm[start + p], :used] = True
        start += n

    hq = num_kv_heads * group
    shape = (num_pages, page_size, 2 * num_kv_heads, head_dim)
    if np.issubdtype(np.dtype(kv_dtype), np.integer):
        kv = rng.integers(-127, 128, shape).astype(kv_dtype)
    elif np.dtype(kv_dtype).itemsize == 1:  # float8: random finite values of that dtype
        kv = rng.normal(0, 2, shape).astype(np.float32).astype(kv_dtype)
    else:
        kv = rng.normal(0, 1, shape).astype(np.float32).astype(kv_dtype)
    is_float = not np.issubdtype(np.dtype(kv_dtype), np.integer)
    if poison and is_float:
        kv[~owned] = np.nan
    if num_layers is not None:
        other = np.full((num_layers,) + shape, np.nan if is_float else 0, np.float32).astype(kv_dtype)
        other[num_layers - 1] = kv
        kv = other

    q_lens = [ql for ql, _ in seqs]
    total = sum(q_lens)
    num_rows = max(1, total + extra_rows)
    q = rng.normal(0, 1, (num_rows, hq, head_dim)).astype(np.float32)
    q[total:] = 1e3  # padding rows: garbage that must not matter
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1:len(seqs) + 1] = np.cumsum(q_lens)
    cu[len(seqs) + 1:] = rng.integers(0, 3 * num_rows + 1, max_seqs - len(seqs))  # garbage padding
    kv_lens = rng.integers(0, 10 * page_size, max_seqs).astype(np.int32)  # garbage padding
    kv_lens[:len(seqs)] = [kv for _, kv in seqs]

    k_scale = v_scale = None
    if scales == "head":
        k_scale = rng.uniform(0.005, 0.02, num_kv_heads).astype(np.float32)
        v_scale = rng.uniform(0.005, 0.02, num_kv_heads).astype(np.float32)
    elif scales == "page":
        k_scale = rng.uniform(0.005, 0.02, (num_pages, num_kv_heads)).astype(np.float32)
        v_scale = rng.uniform(0.005, 0.02, (num_pages, num_kv_heads)).astype(np.float32)
    return Batch(q.astype(q_dtype), kv, kv_lens, page_table, cu, np.array([len(seqs)], np.int32),
                 list(seqs), None if num_layers is None else num_layers - 1, k_scale, v_scale)


def naive_attention(b: Batch, *, sm_scale, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Dense float64 attention, one sequence at a time, straight from the definition."""
    kv = np.asarray(b.kv_pages).astype(np.float64)
    if b.layer is not None:
        kv = kv[b.layer]
    num_pages, page_size, two_h, head_dim = kv.shape
    h = two_h // 2
    q = np.asarray(b.q).astype(np.float64)
    hq = q.shape[1]
    group = hq // h
    out = np.zeros(q.shape, np.float64)
    for s, (q_len, kv_len) in enumerate(b.seqs):
        if q_len == 0:
            continue
        pos = np.arange(kv_len)
        pages = b.page_table[s, pos // page_size]
        tok = kv[pages, pos % page_size]  # [kv_len, 2H, D]
        k, v = tok[:, 0::2], tok[:, 1::2]
        if b.k_scale is not None:
            ks = np.asarray(b.k_scale, np.float64)
            k = k * (ks[pages] if ks.ndim == 2 else ks[None, :])[:, :, None]
        if b.v_scale is not None:
            vs = np.asarray(b.v_scale, np.float64)
            v = v * (vs[pages] if vs.ndim == 2 else vs[None, :])[:, :, None]
        r0 = int(b.cu_q_lens[s])
        qs = q[r0:r0 + q_len]
        q_pos = kv_len - q_len + np.arange(q_len)
        for head in range(hq):
            kh = head // group
            sc = qs[:, head] @ k[:, kh].T * sm_scale
            if soft_cap is not None:
                sc = soft_cap * np.tanh(sc / soft_cap)
            allowed = pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                allowed &= pos[None, :] > q_pos[:, None] - sliding_window
            sc = np.where(allowed, sc, -np.inf)
            p = np.exp(sc - sc.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[r0:r0 + q_len, head] = p @ v[:, kh]
    return out


jitted_reference = jax.jit(reference.ragged_paged_attention,
                           static_argnames=("sm_scale", "sliding_window", "soft_cap"))


@st.composite
def ragged_seqs(draw, page_size=16, max_seqs=4, max_q=20, max_ctx=40):
    """(q_len, kv_len) lists mixing decode, prefill, chunked prefill, empty and page-boundary cases."""
    n = draw(st.integers(1, max_seqs))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["decode", "prefill", "chunk", "empty", "boundary"]))
        if kind == "decode":
            q_len, ctx = 1, draw(st.integers(0, max_ctx))
        elif kind == "prefill":
            q_len, ctx = draw(st.integers(1, max_q)), 0
        elif kind == "chunk":
            q_len, ctx = draw(st.integers(1, max_q)), draw(st.integers(1, max_ctx))
        elif kind == "empty":
            q_len, ctx = 0, draw(st.integers(0, max_ctx))
        else:  # the sequence ends exactly on a page boundary
            total = page_size * draw(st.integers(1, 3))
            q_len = draw(st.integers(1, min(total, max_q)))
            ctx = total - q_len
        out.append((q_len, q_len + ctx))
    return out


# Random ragged batches for an implementation against naive_attention (assert_matches_naive).
RAGGED_CASES = given(seqs=ragged_seqs(), seed=st.integers(0, 2**16), group=st.sampled_from([1, 2, 3]),
                     window=st.sampled_from([None, 1, 7, 20]), soft_cap=st.sampled_from([None, 5.0]),
                     page_size=st.sampled_from([16, 32]))


def assert_matches_naive(fn, seqs, seed, group, window, soft_cap, page_size):
    """fn(*batch.args(), sm_scale=, sliding_window=, soft_cap=) on a RAGGED_CASES batch."""
    b = make_batch(seed, seqs, group=group, page_size=page_size, shape_of=(4, 20, 60))
    got = np.asarray(fn(*b.args(), sm_scale=0.125, sliding_window=window, soft_cap=soft_cap))
    want = naive_attention(b, sm_scale=0.125, sliding_window=window, soft_cap=soft_cap)
    assert np.isfinite(got).all()  # unowned slots hold NaN: none may be read
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    assert not got[b.num_live_rows:].any()  # padding rows are zeros


@SETTINGS
@RAGGED_CASES
def test_reference_matches_naive(seqs, seed, group, window, soft_cap, page_size):
    assert_matches_naive(jitted_reference, seqs, seed, group, window, soft_cap, page_size)


@pytest.mark.parametrize("kv_dtype,scales", [(np.int8, "head"), (np.int8, "page"),
                                             (jnp.float8_e4m3fn, "page"), (jnp.bfloat16, None)])
def test_reference_quantized_and_layered_pool(kv_dtype, scales):
    b = make_batch(3, [(1, 37), (9, 9), (0, 5), (4, 20)], kv_dtype=kv_dtype, scales=scales, num_layers=2,
                   head_dim=128)
    got = np.asarray(reference.ragged_paged_attention(*b.args(), sm_scale=0.1, **b.kwargs()))
    np.testing.assert_allclose(got, naive_attention(b, sm_scale=0.1), atol=2e-5, rtol=2e-5)


def test_reference_zero_padded_cu_q_lens():
    """Regression: cu_q_lens padded with zeros (not monotone) once sent every row to the last sequence."""
    b = make_batch(5, [(5, 5), (1, 18), (7, 30)], extra_seqs=4)
    b.cu_q_lens[4:] = 0
    got = np.asarray(reference.ragged_paged_attention(*b.args(), sm_scale=0.125))
    np.testing.assert_allclose(got, naive_attention(b, sm_scale=0.125), atol=2e-5, rtol=2e-5)


def test_reference_all_padding():
    b = make_batch(0, [], extra_rows=8)
    got = np.asarray(reference.ragged_paged_attention(*b.args(), sm_scale=0.125))
    assert got.shape == b.q.shape and not got.any()


@pytest.mark.parametrize("kv_dtype,scales", [(np.float32, None), (jnp.bfloat16, None), (np.int8, "page"),
                                             (jnp.float8_e4m3fn, "head")])
@pytest.mark.parametrize("layered", [False, True])
def test_write_kv_matches_numpy(kv_dtype, scales, layered):
    rng = np.random.default_rng(1)
    num_pages, page_size, h, d, t = 6, 16, 2, 64, 11
    shape = (num_pages, page_size, 2 * h, d)
    pool = np.zeros(((3,) + shape) if layered else shape, np.float32).astype(kv_dtype)
    k = rng.normal(0, 1, (t, h, d)).astype(np.float32)
    v = rng.normal(0, 1, (t, h, d)).astype(np.float32)
    slots = rng.permutation(num_pages * page_size)[:t].astype(np.int32)
    slots[[2, 7]] = -1  # padding rows write nothing
    ks = vs = None
    if scales == "head":
        ks, vs = np.full(h, 0.02, np.float32), np.full(h, 0.03, np.float32)
    elif scales == "page":
        ks = rng.uniform(0.01, 0.03, (num_pages, h)).astype(np.float32)
        vs = rng.uniform(0.01, 0.03, (num_pages, h)).astype(np.float32)
    layer = 1 if layered else None
    out = jax.jit(reference.write_kv, static_argnames=("layer",), donate_argnums=0)(
        jnp.asarray(pool), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots), layer=layer,
        k_scale=None if ks is None else jnp.asarray(ks), v_scale=None if vs is None else jnp.asarray(vs))
    out = np.asarray(out).astype(np.float32)
    want = np.asarray(pool).astype(np.float32).copy()
    view = want[layer] if layered else want
    for i, s in enumerate(slots):
        if s < 0:
            continue
        p, o = divmod(int(s), page_size)
        for head in range(h):
            kk, vv = k[i, head], v[i, head]
            if ks is not None:
                kk = kk / (ks[p, head] if ks.ndim == 2 else ks[head])
                vv = vv / (vs[p, head] if vs.ndim == 2 else vs[head])
                if np.issubdtype(np.dtype(kv_dtype), np.integer):
                    kk, vv = np.clip(np.round(kk), -128, 127), np.clip(np.round(vv), -128, 127)
            view[p, o, 2 * head] = np.asarray(kk, np.float32).astype(kv_dtype).astype(np.float32)
            view[p, o, 2 * head + 1] = np.asarray(vv, np.float32).astype(kv_dtype).astype(np.float32)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("window", [None, 40])
def test_reference_single_row_step(window):
    """The 1-token bucket takes its own path (no tile loop): one decode row over a context spanning
    several key blocks, and an all-padding step of one row."""
    for seqs in ([(1, 300)], []):
        b = make_batch(7, seqs, group=3, extra_rows=0, extra_seqs=2)
        assert b.q.shape[0] == 1
        got = np.asarray(reference.ragged_paged_attention(*b.args(), sm_scale=0.125, sliding_window=window))
        np.testing.assert_allclose(got, naive_attention(b, sm_scale=0.125, sliding_window=window),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_quantized_pages_per_token_scales(kv_dtype):
    """QuantizedPages: write_kv stores round(x / s) with s = max|x| / top per token and head; attention
    over them equals attention over the float pool holding exactly those dequantized values."""
    rng = np.random.default_rng(2)
    h, d, page_size, num_pages, layers = 2, 64, 16, 8, 2
    pool = reference.allocate_pages((layers, num_pages, page_size, 2 * h, d), kv_dtype)
    t = 40
    k = rng.normal(0, 3, (t, h, d)).astype(np.float32)
    v = rng.normal(0, 1, (t, h, d)).astype(np.float32)
    slots = np.arange(16, 16 + t, dtype=np.int32)  # pages 1.. of one sequence
    pool = reference.write_kv(pool, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots), layer=1)
    assert pool.dtype == kv_dtype and pool.pages.dtype.itemsize == 1  # float8 is kept as its bits
    scales = np.asarray(pool.scales[1])
    deq = np.asarray(pool.load(1))
    top = 127.0 if kv_dtype == jnp.int8 else 448.0
    p, o = slots // page_size, slots % page_size
    np.testing.assert_allclose(scales[p, o, 0], np.abs(k[:, 0]).max(-1) / top, rtol=1e-6)
    step = scales[p, o][..., None] * (0.5 if kv_dtype == jnp.int8 else 16)  # int8 rounding / e4m3 spacing
    assert np.all(np.abs(deq[p, o, 0::2] - k) <= step[:, 0::2] + 1e-7)
    assert np.all(np.abs(deq[p, o, 1::2] - v) <= step[:, 1::2] + 1e-7)
    q = jnp.asarray(rng.normal(0, 1, (3, 2 * h, d)).astype(np.float32))
    args = (jnp.array([t], jnp.int32), jnp.asarray(np.arange(1, 5, dtype=np.int32)[None]),
            jnp.array([0, 3], jnp.int32), jnp.array([1], jnp.int32))
    got = reference.ragged_paged_attention(q, pool, *args, sm_scale=0.125, layer=1)
    float_pool = jnp.zeros((layers, num_pages, page_size, 2 * h, d)).at[1].set(jnp.asarray(deq))
    want = reference.ragged_paged_attention(q, float_pool, *args, sm_scale=0.125, layer=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
