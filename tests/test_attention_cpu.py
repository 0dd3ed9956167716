"""The CPU paged-attention custom call (pallas_kernels/ragged_paged_attention/cpu.py) against the naive
NumPy attention, and its batch invariance: a row's output does not depend on the rest of its step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_kernels.ragged_paged_attention import cpu, ragged_paged_attention
from models.layers import NO_WINDOW
from tests.test_attention_reference import (RAGGED_CASES, SETTINGS, assert_matches_naive, make_batch,
                                            naive_attention)

pytestmark = pytest.mark.skipif(not cpu.usable(jnp.zeros((1, 1, 16)), jnp.zeros(1)),
                                reason="the ggml extension is not built (python -m pallas_kernels.quantized_matmul.build)")

jitted = jax.jit(cpu.ragged_paged_attention, static_argnames=("sm_scale", "soft_cap"))


@SETTINGS
@RAGGED_CASES
def test_cpu_kernel_matches_naive(seqs, seed, group, window, soft_cap, page_size):
    assert_matches_naive(jitted, seqs, seed, group, window, soft_cap, page_size)


def test_layered_pool_traced_window_and_threaded_step():
    """A stacked pool picked by a traced layer, a traced window (NO_WINDOW = none), and a step large
    enough to be split over ggml's thread pool."""
    b = make_batch(4, [(1, 37), (120, 300), (0, 5), (64, 64), (1, 1)], num_layers=3, head_dim=128, group=3)
    f = jax.jit(lambda *a, layer, window: cpu.ragged_paged_attention(*a, sm_scale=0.1, layer=layer,
                                                                    sliding_window=window))
    for window in (None, 50):
        got = np.asarray(f(*b.args(), layer=jnp.int32(b.layer), window=jnp.int32(window or NO_WINDOW)))
        np.testing.assert_allclose(got, naive_attention(b, sm_scale=0.1, sliding_window=window),
                                   atol=2e-5, rtol=2e-5)


def test_a_rows_output_is_the_same_alone_and_in_any_step():
    """Bit-identical: the engine's batch invariance rests on it (steps of any bucket use this kernel)."""
    alone = make_batch(9, [(1, 200)], extra_rows=0, extra_seqs=0, poison=False)
    (got_alone,) = np.asarray(jitted(*alone.args(), sm_scale=0.125))
    # The same sequence (same pages and values) as the third of a large mixed step.
    q = np.concatenate([np.ones((150, *alone.q.shape[1:]), np.float32), alone.q], axis=0)
    table = np.stack([alone.page_table[0]] * 3)
    args = (jnp.asarray(q), jnp.asarray(alone.kv_pages), jnp.array([100, 200, 200], jnp.int32), jnp.asarray(table),
            jnp.array([0, 50, 150, 151], jnp.int32), jnp.array([3], jnp.int32))
    got = np.asarray(jitted(*args, sm_scale=0.125))
    np.testing.assert_array_equal(got[150], got_alone)


def test_auto_backend_picks_it_for_float32_queries_only():
    b = make_batch(1, [(3, 20)], poison=False)
    auto = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.1))
    assert "jaxllm_cpu_paged_attention" in auto.lower(*b.args()).as_text()
    forced = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.1, backend="reference"))
    assert "jaxllm_cpu_paged_attention" not in forced.lower(*b.args()).as_text()
    bf16_pool = (b.args()[0], b.args()[1].astype(jnp.bfloat16)) + b.args()[2:]
    assert "jaxllm_cpu_paged_attention" in auto.lower(*bf16_pool).as_text()
    bf16_model = (b.args()[0].astype(jnp.bfloat16), b.args()[1].astype(jnp.bfloat16)) + b.args()[2:]
    assert "jaxllm_cpu_paged_attention" not in auto.lower(*bf16_model).as_text()


def test_bfloat16_pool_matches_the_reference(monkeypatch):
    """--kv-cache-dtype bfloat16 with a float32 model, without AMX: the kernel widens each tile's bf16 keys
    and values (exactly: a bf16 is the high half of a float32) and attends as over a float32 pool."""
    monkeypatch.setenv("JAXLLM_AMX_BF16", "0")
    b = make_batch(4, [(1, 200), (5, 37), (16, 16)], poison=False)
    args = (b.args()[0], b.args()[1].astype(jnp.bfloat16)) + b.args()[2:]
    got = np.asarray(jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend="cpu"))(*args))
    want = np.asarray(jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend="reference"))(*args))
    rows = b.num_live_rows
    assert np.abs(want[:rows]).sum() > 0
    np.testing.assert_allclose(got[:rows], want[:rows], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_quantized_pages_match_the_reference(kv_dtype):
    """Per-token int8 / float8 pools (float8 held as bits): each byte read through the dtype's value
    table times its token's scale, the same dequantized values the reference attends over."""
    from pallas_kernels.ragged_paged_attention import reference
    rng = np.random.default_rng(5)
    layers, num_pages, page_size, h, d = 2, 12, 16, 2, 64
    pool = reference.allocate_pages((layers, num_pages, page_size, 2 * h, d), kv_dtype)
    t = num_pages * page_size
    k, v = (jnp.asarray(rng.normal(0, s, (t, h, d)).astype(np.float32)) for s in (3.0, 1.0))
    pool = reference.write_kv(pool, k, v, jnp.arange(t, dtype=jnp.int32), layer=1)
    seqs = [(1, 70), (20, 45), (3, 3)]  # (q_len, kv_len)
    table = np.full((4, 8), -1, np.int32)
    for i, perm in enumerate([rng.permutation(num_pages)[:5], rng.permutation(num_pages)[:3], [7]]):
        table[i, :len(perm)] = perm
    rows = sum(q for q, _ in seqs) + 2
    q = jnp.asarray(rng.normal(0, 1, (rows, 2 * h, d)).astype(np.float32))
    cu = np.concatenate([[0], np.cumsum([q_len for q_len, _ in seqs]), [0]]).astype(np.int32)
    args = (q, pool, jnp.array([kv for _, kv in seqs] + [0], jnp.int32), jnp.asarray(table), jnp.asarray(cu),
            jnp.array([3], jnp.int32))
    hlo = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, layer=1)).lower(*args).as_text()
    # "auto" takes int8 pools only (float8's table lookups made prefill slower than the reference)
    assert ("jaxllm_cpu_paged_attention" in hlo) == (kv_dtype == jnp.int8)
    got = np.asarray(cpu.ragged_paged_attention(*args, sm_scale=0.125, layer=1))
    want = np.asarray(ragged_paged_attention(*args, sm_scale=0.125, layer=1, backend="reference"))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    assert np.abs(want[:rows - 2]).sum() > 0 and not got[rows - 2:].any()


def test_head_dims_off_the_16_lane_tiles_take_the_reference():
    """The kernel holds 16 lanes of head_dim per vector; other head sizes stay on the jnp reference."""
    b = make_batch(1, [(3, 20)], poison=False)
    q, pool = b.args()[0], b.args()[1]
    narrow = (q[..., :8], pool[..., :8]) + b.args()[2:]
    assert q.shape[-1] % 16 == 0
    assert "jaxllm_cpu_paged_attention" not in jax.jit(
        lambda *a: ragged_paged_attention(*a, sm_scale=0.1)).lower(*narrow).as_text()


def _amx_attention() -> bool:
    from pallas_kernels.quantized_matmul import build
    return build.AMX_BF16_FLAGS <= build.cpu_flags()


@pytest.mark.skipif(not _amx_attention(), reason="no AMX-BF16 on this CPU: bfloat16 pools take the vector kernel")
@pytest.mark.parametrize("group,page_size,head_dim,window", [(1, 16, 64, None), (3, 16, 64, None), (3, 8, 64, 7),
                                                            (4, 24, 128, None), (16, 32, 64, 100), (2, 16, 128, 2)])
def test_bfloat16_pool_on_amx_tiles(group, page_size, head_dim, window):
    """bfloat16 pools on AMX: q and the softmax weights rounded to bf16 on the tile units, float32 sums.
    Against float64 attention over the bf16-rounded q: within bf16's rounding, never reading a slot no
    sequence owns (they hold NaN), and each row the same alone as inside a larger step."""
    seqs = [(1, 200), (5, 37), (16, 16), (0, 9), (40, 300), (1, 1)]
    b = make_batch(11, seqs, group=group, page_size=page_size, head_dim=head_dim, kv_dtype=jnp.bfloat16)
    b.q = np.asarray(jnp.asarray(b.q).astype(jnp.bfloat16).astype(jnp.float32))
    run = jax.jit(lambda *a: cpu.ragged_paged_attention(*a, sm_scale=0.125, sliding_window=window))
    got = np.asarray(run(*b.args()))
    want = naive_attention(b, sm_scale=0.125, sliding_window=window)
    assert np.isfinite(got).all() and not got[b.num_live_rows:].any()
    assert np.abs(got - want).max() <= 4e-3 * np.abs(want).max()
    exact = np.asarray(jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, sliding_window=window,
                                                                 backend="reference"))(*b.args()))
    assert np.abs(got - exact).max() > 1e-6 * np.abs(want).max()  # the tile path ran, not the widening one
    # the 40-row sequence's rows 8-12 (positions 268-272) alone: the same bits
    start = int(b.cu_q_lens[4]) + 8
    alone = (jnp.asarray(b.q[start:start + 5]), b.args()[1], jnp.asarray(b.kv_lens[4:5]), jnp.asarray(b.page_table[4:5]),
             jnp.array([0, 5], jnp.int32), jnp.array([1], jnp.int32))
    kv_len = int(b.kv_lens[4])
    np.testing.assert_array_equal(np.asarray(run(alone[0], alone[1], jnp.array([kv_len - 40 + 13], jnp.int32),
                                                 *alone[3:]))[:5], got[start:start + 5])
    # row 10 alone is a decode row, whose item holds every KV head's lanes in one tile: the same bits
    one = run(alone[0][2:3], alone[1], jnp.array([kv_len - 40 + 11], jnp.int32), alone[3],
              jnp.array([0, 1], jnp.int32), alone[5])
    np.testing.assert_array_equal(np.asarray(one), got[start + 2:start + 3])


@pytest.mark.skipif(not _amx_attention(), reason="no AMX-BF16 on this CPU: bfloat16 pools take the vector kernel")
@pytest.mark.parametrize("window", [None, 40])
def test_amx_prefill_items_of_many_lane_groups(window):
    """A long prefill's items hold several lane groups (5 rows each at 3 query heads per KV head), which
    share each chunk's K and V fetches: every row has the bits it has in a 5-row step of its own (one
    lane group per item) and as a decode row, and stays within bf16's rounding of float64 attention."""
    b = make_batch(5, [(240, 600), (1, 300)], group=3, num_kv_heads=3, head_dim=64, kv_dtype=jnp.bfloat16)
    b.q = np.asarray(jnp.asarray(b.q).astype(jnp.bfloat16).astype(jnp.float32))
    run = jax.jit(lambda *a: cpu.ragged_paged_attention(*a, sm_scale=0.125, sliding_window=window))
    got = np.asarray(run(*b.args()))
    want = naive_attention(b, sm_scale=0.125, sliding_window=window)
    assert np.abs(got - want).max() <= 4e-3 * np.abs(want).max()
    pool, table = b.args()[1], jnp.asarray(b.page_table[:1])
    for start in (0, 5, 117, 235):  # the first lane groups, one inside an item, the last
        rows = run(jnp.asarray(b.q[start:start + 5]), pool, jnp.array([600 - 240 + start + 5], jnp.int32), table,
                   jnp.array([0, 5], jnp.int32), jnp.array([1], jnp.int32))
        np.testing.assert_array_equal(np.asarray(rows)[:5], got[start:start + 5])
    one = run(jnp.asarray(b.q[150:151]), pool, jnp.array([600 - 240 + 151], jnp.int32), table,
              jnp.array([0, 1], jnp.int32), jnp.array([1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(one)[:1], got[150:151])


def test_bfloat16_pool_writes_in_place_as_the_scatter_would():
    """write_kv into a bfloat16 pool on CPU is a custom call aliasing the pool (XLA:CPU's bf16 scatter
    converts the whole pool to float32 and back): the same bits as the scatter, padding slots unwritten,
    and no whole-pool conversion in the program."""
    from pallas_kernels.ragged_paged_attention import reference, write_kv
    rng = np.random.default_rng(5)
    pool = jnp.asarray(rng.standard_normal((3, 6, 16, 4, 64)), jnp.bfloat16)  # [L, P, S, 2 * Hkv, D]
    k, v = (jnp.asarray(rng.standard_normal((5, 2, 64)) * 3, jnp.float32) for _ in range(2))
    slots = jnp.array([0, 17, -1, 95, 40], jnp.int32)
    want = reference.write_kv(pool, k, v, slots, layer=jnp.int32(2))
    f = jax.jit(lambda pool, layer: write_kv(pool, k, v, slots, layer=layer), donate_argnums=0)
    hlo = f.lower(pool, jnp.int32(2)).compile().as_text()
    assert "jaxllm_cpu_write_kv" in hlo and "f32[3,6,16,4,64]" not in hlo
    got = f(jnp.array(pool), jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
