"""Pure-jnp dequantization of every weight format, and the reference quantized matmul built on it:
the oracle the ggml path is tested against, and the path of every backend without one (the GPU/TPU
compilers may fuse the dequantization into the dot, not yet measured on a device; XLA:CPU
materializes it, see __init__.py).

Weights are [out, in] (one row per output feature, as GGUF and HF store them), optionally with leading
axes (stacked layers). Formats:

  ggml block formats ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"): data uint8
      [..., out, row_bytes], each row a run of blocks exactly as llama.cpp stores them (scales inline);
      a block covers `block_size` consecutive inputs in `block_bytes` bytes.
  "int8": data int8 [..., out, in], scale f32 [..., out]: w = data * scale (symmetric, per channel).
  "fp8":  data float8_e4m3fn [..., out, in], scale f32 [..., out]: w = data * scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# name: (ggml type id, inputs per block, bytes per block) -- ggml's own numbering and sizes.
GGML_FORMATS = {
    "q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q5_0": (6, 32, 22), "q5_1": (7, 32, 24), "q8_0": (8, 32, 34),
    "q4_k": (12, 256, 144), "q5_k": (13, 256, 176), "q6_k": (14, 256, 210),
}
CHANNEL_FORMATS = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def row_bytes(fmt: str, in_features: int) -> int:
    _, block, nbytes = GGML_FORMATS[fmt]
    if in_features % block:
        raise ValueError(f"{fmt} needs the input size to be a multiple of {block}, got {in_features}")
    return in_features // block * nbytes


def in_features(fmt: str, data_shape) -> int:
    if fmt in CHANNEL_FORMATS:
        return int(data_shape[-1])
    _, block, nbytes = GGML_FORMATS[fmt]
    return int(data_shape[-1]) // nbytes * block


def _f16(b: jax.Array) -> jax.Array:
    """[..., 2] little-endian bytes -> [..., 1] float32."""
    return jax.lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[..., None]


def _nibbles(qs: jax.Array) -> jax.Array:
    """[..., n] bytes -> [..., 2n]: all low nibbles, then all high nibbles (ggml's order in a block)."""
    return jnp.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh: jax.Array, n: int) -> jax.Array:
    """[..., 4] bytes of a little-endian u32 -> its n low bits as [..., n] in {0, 1}."""
    bits = (qh[..., :, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # [..., 4, 8], bit j of byte i
    return bits.reshape(qh.shape[:-1] + (32,))[..., :n]


def _k_scales(sc: jax.Array):
    """Q4_K / Q5_K's 12 bytes -> (scales, mins) [..., 8], 6 bits each: the first four of each sit in the
    low 6 bits of bytes 0-3 / 4-7; the last four take bytes 8-11's nibbles plus the top 2 bits of 0-7."""
    lo, mid, hi = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = jnp.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    mins = jnp.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return scales.astype(jnp.float32), mins.astype(jnp.float32)


def _blocks(fmt: str, b: jax.Array) -> jax.Array:
    """[..., block_bytes] uint8 -> [..., block_size] float32."""
    if fmt == "q8_0":
        return _f16(b[..., 0:2]) * jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    if fmt == "q4_0":
        return _f16(b[..., 0:2]) * (_nibbles(b[..., 2:]).astype(jnp.float32) - 8)
    if fmt == "q4_1":
        return _f16(b[..., 0:2]) * _nibbles(b[..., 4:]).astype(jnp.float32) + _f16(b[..., 2:4])
    if fmt in ("q5_0", "q5_1"):
        off = 2 if fmt == "q5_0" else 4
        q = _nibbles(b[..., off + 4:]) | (_high_bits(b[..., off:off + 4], 32) << 4)
        if fmt == "q5_0":
            return _f16(b[..., 0:2]) * (q.astype(jnp.float32) - 16)
        return _f16(b[..., 0:2]) * q.astype(jnp.float32) + _f16(b[..., 2:4])
    if fmt in ("q4_k", "q5_k"):
        # 8 sub-blocks of 32; byte run c (32 bytes) holds sub-block 2c in its low nibbles, 2c+1 in its high
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        scales, mins = _k_scales(b[..., 4:16])
        qs = b[..., -128:].reshape(b.shape[:-1] + (4, 32))
        q = jnp.stack([qs & 15, qs >> 4], axis=-2).reshape(b.shape[:-1] + (8, 32))
        if fmt == "q5_k":  # bit s of qh[l] is the fifth bit of sub-block s's element l
            qh = b[..., 16:48]
            q = q | ((((qh[..., None, :] >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1)) << 4)
        y = d[..., None] * scales[..., None] * q.astype(jnp.float32) - dmin[..., None] * mins[..., None]
        return y.reshape(b.shape[:-1] + (256,))
    if fmt == "q6_k":
        # Two halves of 128; in each, 4 runs of 32: low 4 bits from ql (two 32-byte rows, low/high
        # nibbles), top 2 bits from one 32-byte qh row (bit pairs 0-1, 2-3, 4-5, 6-7); 16 scales of 16.
        ql = b[..., 0:128].reshape(b.shape[:-1] + (2, 2, 32))
        qh = b[..., 128:192].reshape(b.shape[:-1] + (2, 1, 32))
        low = jnp.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2)
        high = (qh >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3
        q = (low | (high << 4)).astype(jnp.float32) - 32  # [..., 2, 4, 32]
        scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
        scales = scales.reshape(b.shape[:-1] + (2, 4, 2, 1))  # scale of each 16 of a run
        y = q.reshape(b.shape[:-1] + (2, 4, 2, 16)) * scales
        return (_f16(b[..., 208:210])[..., None, None, None] * y).reshape(b.shape[:-1] + (256,))
    raise ValueError(f"unknown weight format {fmt!r}")


def dequantize(fmt: str, data: jax.Array, scale: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
    """Any format's weight -> dense [..., out, in] in `dtype`."""
    if fmt in CHANNEL_FORMATS:
        return (data.astype(jnp.float32) * scale[..., None]).astype(dtype)
    _, block, nbytes = GGML_FORMATS[fmt]
    blocks = data.reshape(data.shape[:-1] + (data.shape[-1] // nbytes, nbytes))
    return _blocks(fmt, blocks).reshape(data.shape[:-1] + (-1,)).astype(dtype)


def quantized_matmul(x: jax.Array, fmt: str, data: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x [T, in] @ W^T for W [out, in] -> [T, out] in x's dtype: dequantize, then one dot."""
    if fmt in CHANNEL_FORMATS:  # the scale is per output, so it applies after the dot
        w = data.astype(x.dtype)
        y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return (y * scale).astype(x.dtype)
    w = dequantize(fmt, data, dtype=x.dtype)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=precision)
