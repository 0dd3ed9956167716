"""The Pallas kernels lowered (and, for CUDA, compiled to a cubin) for devices this host lacks.

Interpret mode (test_attention_kernels.py) checks what the kernels compute; it never runs Pallas's
Triton or Mosaic lowering, where a kernel meets the real backend's rules. These tests run that
lowering for every supported dtype, head size, page size and GQA group, and compile the GPU kernel's
Triton IR for an H100 (sm_90) to check it fits: no register spills, shared memory within the SM.
See pallas_kernels/aot.py for what this can and cannot tell.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import aot
from pallas_kernels.ragged_paged_attention import gpu, tpu

# (head_dim, q heads, kv heads, page size, q dtype, kv dtype): each dtype pairing, each head size,
# MHA / GQA / an odd group (SmolLM2's 9 / 3), pages 16 to 128.
CONFIGS = [
    (64, 9, 3, 16, jnp.float32, jnp.float32),
    (64, 8, 8, 32, jnp.bfloat16, jnp.bfloat16),
    (128, 32, 8, 16, jnp.bfloat16, jnp.bfloat16),
    (128, 32, 8, 128, jnp.bfloat16, jnp.int8),
    (128, 16, 2, 64, jnp.float32, jnp.float8_e4m3fn),
    (256, 8, 4, 16, jnp.bfloat16, jnp.float8_e4m3fn),
    (256, 8, 1, 32, jnp.float32, jnp.int8),
]
BATCHES = {"decode": dict(num_rows=32, num_seqs=32, context=1024),
           "mixed": dict(num_rows=512, num_seqs=8, context=1024)}


def _avals(config, batch, **extra):
    head_dim, hq, hkv, page_size, q_dtype, kv_dtype = config
    return aot.attention_avals(**BATCHES[batch], num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                               page_size=page_size, q_dtype=q_dtype, kv_dtype=kv_dtype, **extra)


def _options(config):
    """Per-page scales for quantized pools, window and soft cap on some configs: every kernel branch."""
    kv_dtype = config[-1]
    options = dict(sm_scale=config[0] ** -0.5)
    if jnp.dtype(kv_dtype).itemsize == 1:
        options.update(k_scale=0.5, v_scale=jnp.full((config[2],), 0.25))
    if config[0] == 64:
        options.update(sliding_window=256, soft_cap=30.0)
    return options


def _ids(config):
    head_dim, hq, hkv, page_size, q_dtype, kv_dtype = config
    return f"d{head_dim}-h{hq}/{hkv}-p{page_size}-{jnp.dtype(q_dtype).name}-{jnp.dtype(kv_dtype).name}"


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_gpu_kernel_lowers_to_triton(config, batch):
    options = _options(config)
    lowered = aot.lower(lambda *a: gpu.ragged_paged_attention(*a, **options), *_avals(config, batch),
                        platform="cuda")
    [kernel] = aot.triton_kernels(lowered)
    assert "tt.dot" in kernel.ir and kernel.num_warps in (4, 8)
    num_kv_heads = config[2]
    assert kernel.grid[1] == num_kv_heads


@pytest.fixture(scope="module")
def can_target_tpu():
    """Skip (with jax's reason) where this jax gives Mosaic lowering no way to pick a TPU chip."""
    try:
        with aot.tpu_target("v6e"):
            pass
    except NotImplementedError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_tpu_kernel_lowers_to_mosaic(config, batch, can_target_tpu):
    options = _options(config)
    with aot.tpu_target("v6e"):
        lowered = aot.lower(lambda *a: tpu.ragged_paged_attention(*a, layer=1, **options),
                            *_avals(config, batch, num_layers=2), platform="tpu")
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[4] == jnp.bfloat16] + [CONFIGS[4]], ids=_ids)
@pytest.mark.parametrize("batch", BATCHES)
def test_gpu_kernel_compiles_for_h100_without_spills(config, batch):
    pytest.importorskip("triton")
    lowered = aot.lower(lambda *a: gpu.ragged_paged_attention(*a, **_options(config)),
                        *_avals(config, batch), platform="cuda")
    [kernel] = aot.triton_kernels(lowered)
    stats = aot.compile_triton(kernel, capability=90)
    assert stats.local_bytes == 0, f"register spills: {stats}"
    assert stats.registers <= 255 and 0 < stats.shared_bytes <= aot.HOPPER_MAX_SHARED_BYTES, stats


def test_decode_batches_get_small_gpu_tiles():
    """Decode-sized batches use 16-row tiles (a decode row has only `group` live query rows)."""
    config = (128, 32, 8, 16, jnp.bfloat16, jnp.bfloat16)
    kernels = {batch: aot.triton_kernels(aot.lower(
        lambda *a: gpu.ragged_paged_attention(*a, sm_scale=0.1), *_avals(config, batch), platform="cuda"))[0]
        for batch in BATCHES}
    # decode: cdiv(32 rows, 4 tokens per tile) + 32 spare items; mixed: cdiv(512, 32) + 8.
    assert kernels["decode"].grid[0] == 8 + 32 and kernels["decode"].num_warps == 4
    assert kernels["mixed"].grid[0] == 16 + 8 and kernels["mixed"].num_warps == 8


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn])
def test_unpack_rows_reads_sublane_packed_words(dtype):
    """tpu.unpack_rows (the compiled TPU kernel's bf16 / 8-bit K and V loads) against NumPy packing."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(dtype)
    packing = 4 // dtype.itemsize
    if dtype == np.int8:
        rows = rng.integers(-128, 128, size=(8 * packing, 128)).astype(dtype)
    else:
        rows = rng.normal(size=(8 * packing, 128)).astype(dtype)
        rows[0, :4] = np.array([0.0, -0.0, 448.0 if dtype.itemsize == 1 else 3e38, -1e-3], np.float32)
    unsigned = rows.view(f"uint{8 * dtype.itemsize}").astype(np.uint32).reshape(8, packing, 128)
    words = sum(unsigned[:, lane] << np.uint32(8 * dtype.itemsize * lane) for lane in range(packing))
    for lane in range(packing):
        got = np.asarray(tpu.unpack_rows(jnp.asarray(words, jnp.uint32), dtype, lane))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint8), rows[lane::packing].view(np.uint8))
