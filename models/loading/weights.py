"""Assembles per-layer checkpoint tensors into the stacked canonical weights a model family takes."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from models.config import TransformerConfig
from models.loading.errors import CheckpointError

# Canonical names whose checkpoint tensor is a Linear weight [out, in]: stored transposed [in, out].
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def assemble(config: TransformerConfig, shapes: Mapping[str, tuple[int, ...]], templates: Mapping[str, str],
             get: Callable[[str], np.ndarray | None], source: str, dtype,
             transform: Callable[[str, np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Canonical name -> stacked ndarray of `dtype`.

    shapes: canonical name -> shape (layers.* with the leading layer axis), see models.llama.weight_shapes.
    templates: canonical name -> checkpoint tensor name; layer tensors contain "{i}".
    get: checkpoint tensor name -> array in the checkpoint's layout (Linear: [out, in]), None if absent.
    transform: optional fix-up applied to a tensor in checkpoint layout (e.g. undoing GGUF's q/k order).
    """
    dtype = np.dtype(dtype)
    out = {}
    for name, shape in shapes.items():
        if name not in templates:
            raise CheckpointError(f"{source}: no checkpoint tensor is known for weight {name!r}")
        stacked = name.startswith("layers.")
        layers = range(config.num_layers) if stacked else [None]
        one_shape = shape[1:] if stacked else shape
        linear = name.rsplit(".", 1)[-1] in LINEAR
        want = tuple(reversed(one_shape)) if linear else one_shape
        dest = np.empty(shape, dtype)
        for i in layers:
            key = templates[name].format(i=i)
            arr = get(key)
            if arr is None:
                raise CheckpointError(f"{source}: missing tensor {key!r} (needed for {name})")
            if tuple(arr.shape) != want:
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(arr.shape)}, expected {want} "
                                      f"from the config (hidden={config.hidden_size}, heads={config.num_heads}, "
                                      f"kv_heads={config.num_kv_heads}, head_dim={config.head_dim})")
            if transform is not None:
                arr = transform(name, arr)
            if linear:
                arr = arr.T
            if stacked:
                dest[i] = arr
            else:
                dest[...] = arr
        out[name] = dest
    return out
