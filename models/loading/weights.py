"""Checkpoint tensors -> the stacked canonical weights a model takes, one spec per canonical weight.

A family maps each canonical weight (models/transformer.py, param_specs) to a Source: the checkpoint
tensor's name template ("{i}" layer, "{e}" expert) and an optional transform of that tensor in the
checkpoint's layout (split a fused qkv / gate_up, undo llama.cpp's q/k permutation or Gemma's +1).
After it, the weight's kind fixes the layout: Linear weights and experts [out, in] -> [in, out].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from models.config import TransformerConfig
from models.loading.errors import CheckpointError


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
             finalize: Callable[[str, np.ndarray], object] | None = None) -> dict[str, np.ndarray]:
    """Canonical name -> stacked ndarray of `dtype` (or what finalize makes of it).

    Checkpoint tensors are read one at a time into the stacked array; finalize(name, array) (a device_put
    into the weight's sharding)
    runs as soon as a weight is complete, so its host copy can go: peak host memory is the final
    arrays plus one stacked weight and one checkpoint tensor.

    specs: canonical name -> models.transformer.ParamSpec (shape with the stacked axis, kind, layers).
    sources: canonical name -> Source (or a bare template) in the checkpoint.
    get: checkpoint tensor name -> array in the checkpoint's layout, None if absent.
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
