"""The TPU (Mosaic, TPU interpret mode) and GPU (Triton, Pallas interpret mode) kernels vs the reference.

On a host with the kernel's own accelerator (an NVIDIA GPU for "gpu", a TPU for "tpu") that kernel
runs compiled instead of interpreted: the same tests are its hardware verification.

Tolerances per dtype (absolute and relative, outputs are O(1)):
  f32 activations, f32 / int8 / float8 pages: 2e-5 (both sides accumulate in f32; quantized storage
      values are exact in f32 and the scales are applied in f32).
  bf16 activations (any pages): 3e-2 -- the kernels feed the MXU / tensor cores bf16 q, k and
      probabilities (f32 accumulation), the reference computes in f32 from the same bf16 inputs;
      the output itself is rounded to bf16 (relative step 2**-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.ragged_paged_attention import (gpu, native_kernel, ragged_paged_attention,
                                                   reference, reference_attention, resolve_backend, tpu)
from tests.test_attention_reference import SETTINGS, make_batch, naive_attention, ragged_seqs

KERNELS = {"tpu": tpu.ragged_paged_attention, "gpu": gpu.ragged_paged_attention}
_STATIC = ("sm_scale", "sliding_window", "soft_cap", "interpret")
# Jitted once per module so that equal shapes and settings compile once (compiling the interpreted
# kernels costs seconds, running them on these small batches costs milliseconds).
JITTED = {
    "tpu": jax.jit(tpu.ragged_paged_attention, static_argnames=_STATIC + (
        "num_queries_per_block", "pages_per_block")),
    "gpu": jax.jit(gpu.ragged_paged_attention, static_argnames=_STATIC + (
        "block_q", "block_k", "num_kv_splits", "num_warps", "num_stages")),
    "reference": jax.jit(reference.ragged_paged_attention, static_argnames=_STATIC[:3]),
}


def interpret(impl) -> bool:
    return impl != native_kernel()


def tol(q_dtype):
    return 3e-2 if jnp.dtype(q_dtype) == jnp.bfloat16 else 2e-5


def check(b, impl, *, sm_scale=0.125, sliding_window=None, soft_cap=None, **tuning):
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, **b.kwargs())
    want = np.asarray(JITTED["reference"](*b.args(), **kw)).astype(np.float32)
    got = np.asarray(JITTED[impl](*b.args(), interpret=interpret(impl), **kw, **tuning)).astype(np.float32)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.isfinite(got).all(), "a masked / unowned (NaN) key slot leaked into the output"
    t = tol(b.q.dtype)
    np.testing.assert_allclose(got, want, atol=t, rtol=t)
    assert not got[b.num_live_rows:].any()  # padding rows are zeros
    return got


# ---- randomized ragged batches (hypothesis) ----------------------------------------------------

KERNEL_SETTINGS = settings(SETTINGS, max_examples=25)


# Random batch *contents* at fixed shapes (one compile per config); the configs vary the statics.
BOUNDS = (4, 20, 60)  # max live sequences, max new rows per sequence, max kv length
CONFIGS = [  # group, page_size, sliding_window, soft_cap, tpu tuning, gpu tuning
    (2, 16, None, None, dict(num_queries_per_block=8, pages_per_block=2),
     dict(block_q=8, block_k=32, num_kv_splits=1)),
    (3, 32, 9, 4.0, dict(num_queries_per_block=16, pages_per_block=1),
     dict(block_q=8, block_k=32, num_kv_splits=3)),
    (1, 16, 1, None, dict(num_queries_per_block=16, pages_per_block=4),
     dict(block_q=16, block_k=16, num_kv_splits=2)),
]


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
@KERNEL_SETTINGS
@given(seqs=ragged_seqs(max_seqs=4, max_q=20, max_ctx=40), seed=st.integers(0, 2**16))
def test_kernels_random_batches(impl, config, seqs, seed):
    group, page_size, window, soft_cap, tpu_tuning, gpu_tuning = CONFIGS[config]
    b = make_batch(seed, seqs, group=group, page_size=page_size, shape_of=BOUNDS)
    check(b, impl, sliding_window=window, soft_cap=soft_cap, **(tpu_tuning if impl == "tpu" else gpu_tuning))


# ---- named cases: dtypes, quantized pages, layouts, shapes --------------------------------------

MIXED = [(1, 37), (9, 9), (0, 5), (4, 20), (1, 1), (16, 48)]  # decode, prefill, empty, chunk, boundary


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("q_dtype,kv_dtype,scales", [
    (jnp.bfloat16, jnp.bfloat16, None),
    (np.float32, np.int8, "page"),
    (jnp.bfloat16, jnp.float8_e4m3fn, "head"),
])
def test_dtypes_and_quantized_pages(impl, q_dtype, kv_dtype, scales):
    b = make_batch(7, MIXED, q_dtype=q_dtype, kv_dtype=kv_dtype, scales=scales, group=4)
    check(b, impl)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_layered_pool_traced_layer(impl):
    """layer= reads one layer of a [L, ...] pool in place (the other layers are NaN)."""
    b = make_batch(11, MIXED, num_layers=3)
    b.layer = jnp.int32(2)  # traced-like: an array, as under lax.scan
    check(b, impl)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("page_size,head_dim", [(128, 64), (16, 256)])
def test_page_sizes_and_head_dims(impl, page_size, head_dim):
    b = make_batch(13, [(3, 130), (1, 64), (20, 20)], page_size=page_size, head_dim=head_dim,
                   num_kv_heads=1, group=2)
    check(b, impl)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_decode_only_and_prefill_only(impl):
    decode = make_batch(17, [(1, n) for n in (1, 16, 17, 64, 5)], extra_rows=0)
    check(decode, impl)
    prefill = make_batch(19, [(24, 24), (1, 1), (17, 17)], extra_rows=0, extra_seqs=0)
    check(prefill, impl)
    idle = make_batch(0, [], extra_rows=8, extra_seqs=4)  # num_seqs == 0 (the runner's warm-up step)
    idle.cu_q_lens[:] = 0
    check(idle, impl)


def test_tpu_kernel_many_heads_and_pages_per_block():
    b = make_batch(23, MIXED, num_kv_heads=4, group=1)
    check(b, "tpu", pages_per_block=4, num_queries_per_block=16)


def test_kernels_match_naive_directly():
    """One batch straight against the NumPy oracle, so a shared reference bug cannot hide."""
    b = make_batch(29, MIXED, group=3)
    want = naive_attention(b, sm_scale=0.125, sliding_window=12, soft_cap=6.0)
    for impl in KERNELS:
        got = KERNELS[impl](*b.args(), sm_scale=0.125, sliding_window=12, soft_cap=6.0,
                            interpret=interpret(impl))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


# ---- dispatch ----------------------------------------------------------------------------------

def test_dispatch():
    b = make_batch(31, [(2, 20), (1, 5)])
    if native_kernel() is None:  # CPU host
        assert resolve_backend("auto") == "reference"
        assert resolve_backend("auto", interpret=True) == "tpu"
    with pytest.raises(ValueError):
        resolve_backend("cuda")
    want = np.asarray(reference_attention(*b.args(), sm_scale=0.2))
    for backend in ("auto", "reference", "tpu", "gpu"):
        got = ragged_paged_attention(*b.args(), sm_scale=0.2, backend=backend,
                                     interpret=backend in KERNELS and interpret(backend))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


# ---- JAX's shipped TPU kernel as a second oracle -----------------------------------------------

def test_against_jax_shipped_tpu_kernel():
    """jax.experimental.pallas.ops.tpu.ragged_paged_attention (TPU interpret mode), if it runs here."""
    try:
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as shipped
    except ImportError as e:  # moved or removed in this jax version
        pytest.skip(f"shipped kernel not importable: {e}")
    b = make_batch(37, [(1, 37), (9, 9), (4, 20), (16, 48)], extra_seqs=0, extra_rows=0, poison=False,
                   num_kv_heads=1, group=2, head_dim=128)
    b.page_table = np.clip(b.page_table, 0, b.kv_pages.shape[0] - 1)  # it assumes a valid table
    try:
        with pltpu.force_tpu_interpret_mode():
            want = shipped.ragged_paged_attention(*b.args(), sm_scale=0.125, num_kv_pages_per_block=2,
                                                  num_queries_per_block=8)
            want = np.asarray(want)
    except Exception as e:  # noqa: BLE001 -- an oracle we do not own; its limits are not our bug
        pytest.skip(f"shipped kernel does not run in interpret mode here: {type(e).__name__}: "
                    f"{str(e).strip().splitlines()[-1][:200]}")
    live = b.num_live_rows
    ours = np.asarray(tpu.ragged_paged_attention(*b.args(), sm_scale=0.125, interpret=True))
    np.testing.assert_allclose(ours[:live], want[:live], atol=1e-4, rtol=1e-4)
