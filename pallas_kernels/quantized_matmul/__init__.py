"""Matmuls with weights kept quantized: `QuantizedArray` (the weight type) and `quantized_matmul`.

  quantized_matmul(x [T, in], w: QuantizedArray [out, in]) -> [T, out] in x's dtype

Dispatch:
  - weights repacked for AMX at load (pack_for_amx, Intel Xeon 4th gen+): ggml's AMX int8 kernels,
    or for steps of AMX_BF16_MIN_ROWS or more live rows of Q4_0 / Q4_1 / Q8_0 on CPUs with AMX-BF16 our bf16 tile
    GEMM (amx_bf16.cc), or for smaller steps of AMX_INT8_MIN_ROWS or more live rows of Q4_1 our int8 tile
    kernel (amx_int8.cc: ggml's numbers bit for bit), all inside the one custom call (the repacked bytes
    are readable by nothing else);
  - ggml block formats on CPU, T <= GGML_MAX_ROWS, extension built: ggml's kernels (ggml_cpu.py);
  - ggml block formats on a CPU with bf16 dots, T >= BF16_MIN_ROWS (prefill): dequantized to bfloat16
    and one bf16 GEMM (see _prefill_in_bf16);
  - fp8 channel weights on an NVIDIA GPU with fp8 tensor cores (compute capability 8.9+): the
    activations are quantized per token to e4m3 too and one e4m3 x e4m3 -> float32 dot runs natively
    (dynamic_quantized_matmul; vLLM's fp8 dynamic per-token scheme). int8 stays weight-only: with
    int8 activations per token SmolLM2's top-1 agreement with HF fell to 88.7 % (95.0 % weight-only;
    fp8 W8A8 95.0 %), so the int8 x int8 dot is not used by default, even on TPUs;
  - everything else: reference.py (dequantize, then one dot). The GPU/TPU compilers may fuse that
    dequantization into the dot (not yet measured on a device); XLA:CPU materializes it, which is
    why the CPU has the ggml path.

Measured on the 2-core dev VM (SmolLM2-135M's 30 layers of Q4_1 projections, 7 matmuls each, in one
jitted loop): T=1 f32 weights 36 ms, Q4_1 via ggml 8.2 ms, Q4_1 dequantized in XLA 85 ms; T=16: 55,
51, 100 ms; T=64: 96, 183, ~140 ms. ggml's Q4_1 kernel is a per-row dot product (llama.cpp's batched
GEMMs cover other formats), so past a few dozen rows the reference path wins: hence the row cap.
On the same VM once it ran on an Intel Xeon with AMX (2026-12-02; row kernels -> AMX kernels): T=1
10.4 -> 3.4 ms, T=16 51.6 -> 9.1 ms, T=128 373 -> 62 ms, T=512 1470 -> 231 ms (the bf16 GEMM of large
steps: ~260 ms). Then AMX int8 -> AMX bf16 tiles for large steps (same sitting): T=128 59.8 -> 39.7 ms,
T=256 113.8 -> 72.5 ms, T=512 213.6 -> 99.9 ms; the bf16 tiles win from ~48 rows (T=64 29.7 vs 24.8 ms),
so AMX_BF16_MIN_ROWS is 64 (whole-model steps, same sitting: 64 decode rows 63.5 -> 47.4 ms, a 96-row
step 83.9 -> 63.8 ms, 32 rows even); the XLA path's bf16 threshold stays at 128.
Then Q4_1's 2-63 rows moved from ggml's int8 tile kernel to amx_int8.cc's (2026-12-04, same projections,
ggml's / ours): 2 rows 6.3 / 4.7 ms, 8 rows 8.3 / 5.7, 16 rows 9.4 / 8.2, 32 rows 20.4 / 13.8, 48 rows
30 / 19.3; the bf16 GEMM 16.6 at 32 rows, 20.4 at 48, 27.1 at 64, 36.1 at 96 against ours' 25.1 and 37.9.
Those loops keep the weights hotter than a model step does: whole SmolLM2 steps (in-process, 500 cached
tokens plus new ones, alternating AMX_BF16_MIN_ROWS 64 / 8) put the crossover near 40 rows: 16 new tokens
15.7 / 19-25 ms, 24: 18.9 / 21.5-25.9, 32: 24.0 / 25.1, 40: 25.5 / 25.5, 51: 31.4 / 28.5 (threshold 32).
So AMX_BF16_MIN_ROWS is 40, taken on the step's live rows (a step compiled for 64 rows with 34 live
ones went to the bf16 GEMM before, one compiled for 32 with 20 to ggml's kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import ggml_cpu, reference
from pallas_kernels.quantized_matmul.reference import CHANNEL_FORMATS, GGML_FORMATS, dequantize

GGML_MAX_ROWS = 32
GGML_MAX_WEIGHTS = 4  # per call: ggml_ffi.cc's kMaxWeights
BF16_MIN_ROWS = 128  # the XLA path's dequantize-to-bf16 (CPUs with bf16 dots, no AMX layout)
AMX_BF16_MIN_ROWS = 40  # AMX-layout weights: our bf16 tile GEMM instead of ggml's int8 tile kernels
AMX_INT8_MIN_ROWS = 2  # AMX-layout Q4_1 weights: amx_int8.cc's tile kernel instead of ggml's (one row: its VNNI GEMV)


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A weight [..., out, in] in one of reference.py's formats (data, and per-channel scale for
    int8 / fp8). Leading axes are stacked layers; inside a layer scan `layer` names this layer and
    `data` stays the whole stack (a custom call would otherwise be handed a copied slice).
    amx_in_features: 0, or `in` when data holds the rows repacked into ggml's AMX tile layout
    (pack_for_amx), which only ggml's CPU kernels read.
    live_rows: None, or (set with the layer inside a step) how many leading rows of the input are live;
    the rest is the step's padding up to its compiled size, which ggml's kernels skip (zero outputs)."""

    data: jax.Array
    scale: jax.Array | None
    layer: jax.Array | None
    fmt: str
    amx_in_features: int = 0
    live_rows: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        lead = self.data.shape[:-1] if self.layer is None else self.data.shape[1:-1]
        return tuple(lead) + (self.amx_in_features or reference.in_features(self.fmt, self.data.shape),)

    def at_layer(self, layer, live_rows=None) -> QuantizedArray:
        return dataclasses.replace(self, layer=layer, live_rows=live_rows)

    def one_layer(self) -> tuple[jax.Array, jax.Array | None]:
        """(data, scale) of this weight alone (sliced out of the stack when `layer` is set)."""
        if self.amx_in_features:
            raise ValueError("this weight is in ggml's AMX tile layout (pack_for_amx): only ggml's CPU "
                             "kernels read it; load it without repacking for another use")
        if self.layer is None:
            return self.data, self.scale
        take = lambda a: None if a is None else jax.lax.dynamic_index_in_dim(a, self.layer, keepdims=False)
        return take(self.data), take(self.scale)


jax.tree_util.register_dataclass(QuantizedArray, data_fields=["data", "scale", "layer", "live_rows"],
                                 meta_fields=["fmt", "amx_in_features"])


def pack_for_amx(w: QuantizedArray) -> QuantizedArray:
    """w with its rows repacked once into ggml's AMX tile layout, where this CPU and build have ggml's
    AMX int8 kernels for its format (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) and shape (out a multiple of
    32); otherwise w unchanged. On CPUs with AMX, ggml's row-layout kernels of most formats are one dot
    per row, so a 16-row decode step costs ~16x one row; the tile kernels run it as one GEMM."""
    if w.amx_in_features or w.fmt not in GGML_FORMATS or w.layer is not None:
        return w
    ggml_type, k = GGML_FORMATS[w.fmt][0], reference.in_features(w.fmt, w.data.shape)
    if ggml_cpu.amx_row_bytes(ggml_type, w.data.shape[-2], k) == 0:
        return w
    packed = ggml_cpu.amx_pack(ggml_type, np.asarray(w.data), k)
    return QuantizedArray(jnp.asarray(packed), None, None, w.fmt, amx_in_features=k)


def _use_ggml(x: jax.Array, w: QuantizedArray) -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    split = not mesh.empty and mesh.size > 1  # a custom call is one device's program; GSPMD cannot split it
    if w.amx_in_features:
        if split or jax.default_backend() != "cpu":
            raise ValueError("a weight in ggml's AMX layout is read by ggml's CPU kernels on one device only")
        return True
    if w.fmt not in GGML_FORMATS or x.shape[0] > GGML_MAX_ROWS or jax.default_backend() != "cpu" or split:
        return False
    return ggml_cpu.available()


@functools.cache
def _cpu_has_bf16_dots() -> bool:
    from pallas_kernels.quantized_matmul import build
    return bool(build.cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _prefill_in_bf16(x: jax.Array, w: QuantizedArray) -> bool:
    """Large steps of block formats on a CPU with bfloat16 dot instructions: dequantizing to bfloat16
    writes half the bytes and oneDNN's bf16 GEMM is ~2x float32's (SmolLM2's Q4_1 projections, 512 rows:
    260 ms vs 559 ms dequantized to float32 vs 505 ms for float32 weights). ggml already quantizes the
    activations of small steps, so kept-quantized GGUF models are not bit-exact to begin with."""
    return (w.fmt in GGML_FORMATS and x.shape[0] >= BF16_MIN_ROWS and x.dtype == jnp.float32
            and jax.default_backend() == "cpu" and _cpu_has_bf16_dots())


def _amx_bf16_min_rows() -> int:
    """Steps of at least AMX_BF16_MIN_ROWS live rows multiply Q4_0 / Q4_1 / Q8_0 weights in the AMX layout as one
    bf16 tile GEMM (amx_bf16.cc) rather than ggml's int8 tile kernels, which re-scale every 32 of k in
    AVX-512; JAXLLM_AMX_BF16=0 keeps ggml's kernels at every size."""
    return 0 if os.environ.get("JAXLLM_AMX_BF16", "1") == "0" else AMX_BF16_MIN_ROWS


def _amx_int8_min_rows() -> int:
    """Steps of AMX_INT8_MIN_ROWS live rows up to AMX_BF16_MIN_ROWS multiply Q4_1 weights in the AMX
    layout by amx_int8.cc's tile kernel, which gives ggml's numbers bit for bit at a lower cost (its
    header says why); JAXLLM_AMX_INT8=0 keeps ggml's own kernels."""
    return 0 if os.environ.get("JAXLLM_AMX_INT8", "1") == "0" else AMX_INT8_MIN_ROWS


def native_low_precision(fmt: str, device=None) -> bool:
    """Whether `fmt`'s weights meet activations of their own type in a native dot on this device:
    float8 e4m3 on NVIDIA GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell). int8 stays
    weight-only (see the module docstring)."""
    device = device if device is not None else jax.devices()[0]
    if fmt == "fp8" and device.platform in ("gpu", "cuda"):
        try:
            return float(getattr(device, "compute_capability", 0) or 0) >= 8.9
        except ValueError:
            return False
    return False


def dynamic_quantized_matmul(x: jax.Array, fmt: str, data: jax.Array, scale: jax.Array) -> jax.Array:
    """x [T, in] @ (data [out, in] * scale [out])^T with x quantized per row (token) to `fmt` too, so
    the dot itself runs in int8 (int32 accumulation) or float8 e4m3 (float32 accumulation), then both
    scales apply to the output: y = (x_q @ data^T) * s_x * s_w."""
    dtype = CHANNEL_FORMATS[fmt]
    top = 127.0 if fmt == "int8" else float(jnp.finfo(dtype).max)
    xf = x.astype(jnp.float32)
    sx = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / top
    sx = jnp.where(sx > 0, sx, 1.0)
    xq = jnp.clip(xf / sx, -top, top)
    xq = jnp.round(xq).astype(dtype) if fmt == "int8" else xq.astype(dtype)
    acc = jnp.int32 if fmt == "int8" else jnp.float32
    y = jax.lax.dot_general(xq, data, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    return (y.astype(jnp.float32) * sx * scale[None, :].astype(jnp.float32)).astype(x.dtype)


def _ggml(x: jax.Array, ws: list[QuantizedArray], glu: bool = False) -> list[jax.Array]:
    ys = ggml_cpu.mul_mats(x, [(GGML_FORMATS[w.fmt][0], w.data) for w in ws], ws[0].layer,
                           [bool(w.amx_in_features) for w in ws], bf16_min_rows=_amx_bf16_min_rows(),
                           int8_min_rows=_amx_int8_min_rows(),
                           live_rows=ws[0].live_rows, glu=glu)
    return [y.astype(x.dtype) for y in ys]


def _one_ggml_call(x: jax.Array, ws: list[QuantizedArray]) -> bool:
    same_call = lambda w: w.layer is ws[0].layer and w.live_rows is ws[0].live_rows
    return len(ws) <= GGML_MAX_WEIGHTS and all(_use_ggml(x, w) and same_call(w) for w in ws)


def quantized_matmuls(x: jax.Array, ws: list[QuantizedArray]) -> list[jax.Array]:
    """[x @ W^T for W in ws]: one ggml call for all of them when each takes the ggml path (q/k/v and
    gate/up share their input), otherwise one matmul each."""
    if _one_ggml_call(x, ws):
        return _ggml(x, ws)
    return [quantized_matmul(x, w) for w in ws]


def quantized_swiglu(x: jax.Array, gate: QuantizedArray, up: QuantizedArray) -> jax.Array | None:
    """silu(x @ gate^T) * (x @ up^T) [T, out] in the ggml call of both projections (only the step's
    live rows, vectorized by ggml), or None where they do not take one ggml call. Left to XLA:CPU it is
    a pass of its own over the padded products: a lone 512-token SmolLM2 prefill took ~159 ms that way,
    ~148 ms this way."""
    if not _one_ggml_call(x, [gate, up]):
        return None
    return _ggml(x, [gate, up], glu=True)[0]


def quantized_matmul(x: jax.Array, w: QuantizedArray) -> jax.Array:
    """x [T, in] @ W^T -> [T, out] in x's dtype."""
    if _use_ggml(x, w):
        return _ggml(x, [w])[0]
    data, scale = w.one_layer()
    if _prefill_in_bf16(x, w):
        wb = dequantize(w.fmt, data, dtype=jnp.bfloat16)
        y = jax.lax.dot_general(x.astype(jnp.bfloat16), wb, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    if w.fmt in CHANNEL_FORMATS and native_low_precision(w.fmt):
        return dynamic_quantized_matmul(x, w.fmt, data, scale)
    return reference.quantized_matmul(x, w.fmt, data, scale)


def take_rows(w: QuantizedArray, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Rows `ids` of a [rows, in] weight, dequantized: an embedding lookup that never expands the table."""
    data, scale = w.one_layer()
    return dequantize(w.fmt, jnp.take(data, ids, axis=0),
                      None if scale is None else jnp.take(scale, ids, axis=0), dtype)


def quantize_channels(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """float [..., out, in] -> (data [..., out, in], scale [..., out] f32): symmetric per output channel,
    the largest |w| of a row mapped to the format's largest value."""
    w = np.asarray(w, np.float32)
    dtype = CHANNEL_FORMATS[fmt]
    top = 127.0 if fmt == "int8" else float(jnp.finfo(dtype).max)
    amax = np.max(np.abs(w), axis=-1)
    scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    q = w / scale[..., None]
    if fmt == "int8":
        return np.clip(np.rint(q), -127, 127).astype(np.int8), scale
    return np.asarray(jnp.asarray(q).astype(dtype)), scale


def channels_as_q8_0(data: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per-channel int8 weights [..., out, in] as ggml Q8_0 blocks [..., out, row_bytes] holding the same
    int8 values with the row's scale (rounded to float16) in every block: the same weight, in a layout
    ggml's CPU kernels read."""
    blocks = data.reshape(data.shape[:-1] + (-1, 32)).view(np.uint8)
    d = np.broadcast_to(scale.astype(np.float16)[..., None, None], blocks.shape[:-1] + (1,)).view(np.uint8)
    d = np.ascontiguousarray(d).reshape(blocks.shape[:-1] + (2,))
    return np.concatenate([d, blocks], axis=-1).reshape(data.shape[:-1] + (-1,))


__all__ = ["QuantizedArray", "quantized_matmul", "quantized_matmuls", "quantized_swiglu", "take_rows", "dequantize",
           "quantize_channels", "pack_for_amx",
           "native_low_precision", "dynamic_quantized_matmul",
           "channels_as_q8_0", "GGML_FORMATS", "CHANNEL_FORMATS", "GGML_MAX_ROWS", "GGML_MAX_WEIGHTS"]
