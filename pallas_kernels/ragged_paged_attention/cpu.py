"""Ragged paged attention on CPU: reference.py's contract as one XLA custom call per layer (cpu_ffi.cc).

XLA:CPU runs the jnp reference as a loop of page gathers, transposes and small dots, which costs ~90 us
per layer per 128 keys even for a single decode row. The custom call walks each row's own pages in
place (a (row, KV head) per task, on ggml's thread pool unless the step is tiny), in tiles of 16 keys
held as vectors (GCC/Clang vector extensions: one AVX-512 register per 16 scores), and takes every step
shape, prefill included, so a row's result never depends on the bucket its step fell in. head_dim must
be a multiple of 16.

Pools: float32, bfloat16 (`--kv-cache-dtype bfloat16`: widened per tile), or per-token QuantizedPages
(int8 values converted directly; float8 bytes read through a 256-entry table of their values; either
times its token's scale). backend="auto" on CPU uses it for float32, bfloat16 and int8 pools when the
extension is built (`python -m pallas_kernels.quantized_matmul.build`; `JAXLLM_GGML=0` turns it off). Float8 pools stay on the reference under "auto" (backend="cpu" forces
them here): the table lookup does not vectorize, so prefill is slower than the reference's, though
decode is faster. 30 layers of SmolLM2's shapes on the 2-core dev VM (custom call vs reference):

  pool      1 row over 1,000 keys   16 rows over 230 keys   a 512-token prefill
  float32   4.0 ms vs 20.2           10.4 ms vs 53.8          115 ms vs 290
  int8      4.1 ms vs 15.0           8.1 ms vs 40.9          176 ms vs 297
  float8    7.1 ms vs 14.1           14.5 ms vs 47.8         453 ms vs 291

bfloat16 pools on CPUs with AMX-BF16 run on the tile units (cpu_ffi.cc's attend_amx: q and the softmax
weights rounded to bf16, float32 sums; JAXLLM_AMX_BF16=0 keeps the vector tiles): a 512-token prefill
~50 ms where the float32 pool's vector tiles take ~105, 16 rows over 230 keys ~9 ms (2026-12-02). A
prefill's item there holds up to 8 lane groups of rows, which fetch each chunk's K / V rows and pair V
once for all of them (same bits per row); one layer of SmolLM2's shapes on a slow day of the VM
(`python -m benchmarks.kernels --backend cpu --dtype float32 --kv-dtype bfloat16 --num-q-heads 9
--num-kv-heads 3 --head-dim 64 --no-compare --case ...`, three runs alternating with the previous build,
2026-12-03): 60 rows over 652 keys 0.46-0.50 -> 0.31-0.41 ms, the same beside 7 decode rows 0.64-0.72 ->
0.50-0.53 ms, a 512-token prefill 1.9-2.9 -> 1.3-1.4 ms, a 2,000-token prefill 24-36 -> 13-14 ms. Their
writes go through write_kv here too: XLA:CPU's bfloat16 scatter converts the whole pool around it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import ggml_cpu
from pallas_kernels.quantized_matmul.reference import GGML_FORMATS
from pallas_kernels.ragged_paged_attention.reference import QuantizedPages


def _byte_values(dtype) -> np.ndarray:
    """f32 [256]: the value of each byte as `dtype` (int8, or a float8's bit pattern)."""
    return np.arange(256, dtype=np.uint8).view(np.dtype(dtype)).astype(np.float32)


def usable(q: jax.Array, kv_pages, k_scale=None, v_scale=None, *, float8: bool = False) -> bool:
    """Whether this call can take the custom call: CPU, extension built, float32 q with head_dim a
    multiple of 16, and a float32, bfloat16 or per-token int8 pool (float8 too with float8=True)."""
    pool_ok = ((isinstance(kv_pages, QuantizedPages) and (float8 or kv_pages.dtype == jnp.int8))
               or (isinstance(kv_pages, jax.Array) and kv_pages.dtype in (jnp.float32, jnp.bfloat16)))
    return (jax.default_backend() == "cpu" and k_scale is None and v_scale is None and pool_ok
            and q.dtype == jnp.float32 and q.shape[-1] % 16 == 0 and ggml_cpu.available())


def bf16_pool_on_tiles(num_q_heads: int, num_kv_heads: int, head_dim: int, soft_cap: float | None = None) -> bool:
    """Whether this CPU and build run a bfloat16 pool's attention on the AMX tiles (cpu_ffi.cc's
    amx_attention: AMX-BF16 granted, head_dim a multiple of 32, up to 16 query heads per KV head, no
    soft cap)."""
    return (jax.default_backend() == "cpu" and os.environ.get("JAXLLM_AMX_BF16", "1") != "0"
            and head_dim % 32 == 0 and num_q_heads // num_kv_heads <= 16 and not soft_cap
            and ggml_cpu.amx_bf16_takes(GGML_FORMATS["q8_0"][0]))


def ragged_paged_attention(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array, page_table: jax.Array,
                           cu_q_lens: jax.Array, num_seqs: jax.Array, *, sm_scale: float,
                           sliding_window=None, soft_cap: float | None = None, layer=None) -> jax.Array:
    """q [T, Hq, D] f32 over kv_pages [(L,) P, S, 2 * Hkv, D] (f32, or QuantizedPages) -> [T, Hq, D]; see
    reference.py. sliding_window may be traced (a per-layer value inside a scan)."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    window = i32(-1 if sliding_window is None else sliding_window).reshape(())
    index = i32(0 if layer is None else layer).reshape(())
    if isinstance(kv_pages, QuantizedPages):
        pool, scales, lut = kv_pages.pages, kv_pages.scales, jnp.asarray(_byte_values(kv_pages.dtype))
    else:
        pool, scales, lut = kv_pages, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32)
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(ggml_cpu.ATTENTION_TARGET, out, has_side_effect=False)(
        q, pool, scales, lut, index, i32(kv_lens), i32(page_table), i32(cu_q_lens), i32(num_seqs).reshape(1), window,
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        amx_bf16=np.int64(os.environ.get("JAXLLM_AMX_BF16", "1") != "0"), n_threads=np.int64(ggml_cpu.num_threads()), poll=np.int64(ggml_cpu.poll()))


def writes_kv(kv_pages) -> bool:
    """Whether write_kv takes the custom call (a bfloat16 pool on CPU, extension built): XLA:CPU's own
    bfloat16 scatter converts the whole pool to float32 and back around each write."""
    return (isinstance(kv_pages, jax.Array) and kv_pages.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
            and ggml_cpu.available())


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array, *, layer=None) -> jax.Array:
    """reference.write_kv for a bfloat16 pool, in place (the result aliases kv_pages: donate it)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    rows = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim).astype(jnp.float32)
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    return jax.ffi.ffi_call(ggml_cpu.WRITE_KV_TARGET, jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
                            input_output_aliases={0: 0})(kv_pages, rows, jnp.asarray(slot_mapping, jnp.int32), index)
