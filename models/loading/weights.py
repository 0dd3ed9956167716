"""Checkpoint tensors -> the stacked canonical weights a model takes, one spec per canonical weight.

A family maps each canonical weight (models/transformer.py, param_specs) to a Source: the checkpoint
tensor's name template ("{i}" layer, "{e}" expert) and an optional transform of that tensor in the
checkpoint's layout (split a fused qkv / gate_up, undo llama.cpp's q/k permutation or Gemma's +1).
After it, the weight's kind fixes the layout: Linear weights and experts [out, in] -> [in, out].

Weights kept quantized (GGUF blocks, see `packed`) stay [out, row_bytes], rows as the file has them:
transforms of linear weights only move or select whole rows, so they apply to packed rows unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from models.config import TransformerConfig
from models.loading.errors import CheckpointError
from pallas_kernels.quantized_matmul import QuantizedArray
from pallas_kernels.quantized_matmul.reference import row_bytes

# Weights that may stay quantized: the projections, the embedding and the head (not the router, whose
# float32 routing decides which experts run).
KEEPABLE_KINDS = ("linear", "embed")


@dataclasses.dataclass(frozen=True)
class Source:
    """template: checkpoint tensor name; transform: checkpoint-layout array -> checkpoint-layout array;
    shape: the checkpoint tensor's expected shape when transform changes it (a fused tensor)."""

    template: str
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    shape: tuple[int, ...] | None = None


def shifted(template: str, by: float) -> Source:
    """w + by: llama.cpp's Gemma converter stores norm weights as 1 + w (its norms have no offset)."""
    return Source(template, lambda w: w + np.float32(by))


def _checkpoint_shape(kind: str, shape: tuple[int, ...], per_expert: bool) -> tuple[int, ...]:
    """One layer's tensor as the checkpoint stores it ([out, in] for linear weights)."""
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "experts":  # canonical [E, in, out]
        return tuple(reversed(shape[1:])) if per_expert else (shape[0],) + tuple(reversed(shape[1:]))
    return shape


def _to_canonical(kind: str, arr: np.ndarray) -> np.ndarray:
    return np.swapaxes(arr, -1, -2) if kind in ("linear", "experts") else arr


def assemble(config: TransformerConfig, specs: Mapping, sources: Mapping[str, Source | str],
             get: Callable[[str], np.ndarray | None], source: str, dtype,
             finalize: Callable[[str, np.ndarray], object] | None = None,
             packed: Callable[[str], tuple[str, np.ndarray] | None] | None = None) -> dict[str, np.ndarray]:
    """Canonical name -> stacked ndarray of `dtype` (or what finalize makes of it).

    Checkpoint tensors are read one at a time into the stacked array; finalize(name, array) (a device_put
    into the weight's sharding)
    runs as soon as a weight is complete, so its host copy can go: peak host memory is the final
    arrays plus one stacked weight and one checkpoint tensor.

    specs: canonical name -> models.transformer.ParamSpec (shape with the stacked axis, kind, layers).
    sources: canonical name -> Source (or a bare template) in the checkpoint.
    get: checkpoint tensor name -> array in the checkpoint's layout, None if absent.
    packed: checkpoint tensor name -> (format, uint8 [out, row_bytes]) for a tensor to keep quantized,
    else None. A weight stays quantized when every layer's tensor has the same format; otherwise (a
    Q4_K_M file mixes Q4_K and Q6_K layers of one weight) it is dequantized like any other.
    """
    dtype = np.dtype(dtype)
    out = {}
    last: list = [None, None]  # fused tensors are read once for their several parts

    def fetch(key):
        if last[0] != key:
            last[:] = [key, get(key)]
        return last[1]

    for name, spec in specs.items():
        src = sources.get(name)
        if src is None:
            raise CheckpointError(f"{source}: no checkpoint tensor is known for weight {name!r}")
        src = Source(src) if isinstance(src, str) else src
        layers = spec.layers if spec.layers is not None else [None]
        kept = None if packed is None else _assemble_packed(name, spec, src, layers, packed, source)
        if kept is not None:
            out[name] = kept if finalize is None else finalize(name, kept)
            continue
        one_shape = spec.shape[1:] if spec.layers is not None else spec.shape
        per_expert = "{e}" in src.template
        experts = range(one_shape[0]) if per_expert else [None]
        want = _checkpoint_shape(spec.kind, one_shape, per_expert)
        if src.shape is not None:  # a fused tensor: only its leading (row) dim differs
            want = want[:-2] + (src.shape,) + want[-1:]
        dest = np.empty(spec.shape, dtype)
        for row, i in enumerate(layers):
            for e in experts:
                key = src.template.format(i=i, e=e)
                arr = fetch(key)
                if arr is None:
                    raise CheckpointError(f"{source}: missing tensor {key!r} (needed for {name})")
                if tuple(arr.shape) != want:
                    raise CheckpointError(
                        f"{source}: tensor {key!r} has shape {tuple(arr.shape)}, expected {want} from the "
                        f"config (hidden={config.hidden_size}, heads={config.num_heads}, kv_heads="
                        f"{config.num_kv_heads}, head_dim={config.head_dim})")
                if src.transform is not None:
                    arr = src.transform(arr)
                arr = _to_canonical(spec.kind, arr)
                index = tuple(x for x in (None if i is None else row, e) if x is not None)
                dest[index] = arr
        out[name] = dest if finalize is None else finalize(name, dest)
        del dest, arr
        last[:] = [None, None]
    return out


def _assemble_packed(name, spec, src: Source, layers, packed, source: str) -> QuantizedArray | None:
    """The stacked [.., out, row_bytes] quantized weight, or None if it cannot stay quantized."""
    if spec.kind not in KEEPABLE_KINDS or name == "layers.router" or "{e}" in src.template:
        return None
    tensors = [packed(src.template.format(i=i)) for i in layers]
    formats = {t[0] if t is not None else None for t in tensors}
    if len(formats) != 1 or None in formats:
        return None
    fmt = formats.pop()
    one_shape = spec.shape[1:] if spec.layers is not None else spec.shape
    rows, inputs = (one_shape[0], one_shape[1]) if spec.kind == "embed" else (one_shape[1], one_shape[0])
    if inputs % 256 and fmt.endswith("_k") or inputs % 32:
        return None
    want_rows = src.shape if src.shape is not None else rows
    want = (want_rows, row_bytes(fmt, inputs))
    dest = np.empty(spec.shape[:-2] + (rows, want[1]), np.uint8)
    for row, (i, (_, arr)) in enumerate(zip(layers, tensors)):
        if tuple(arr.shape) != want:
            raise CheckpointError(f"{source}: tensor {src.template.format(i=i)!r} ({fmt}) has shape "
                                  f"{tuple(arr.shape)}, expected {want} for {name}")
        if src.transform is not None:
            arr = src.transform(arr)
        dest[row if i is not None else ...] = arr
    return QuantizedArray(dest, None, None, fmt)
