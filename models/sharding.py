"""Where parameters and the KV pool live on the ("data", "model") mesh: Megatron tensor parallel.

One mesh even for one device (1 x 1): the same code path runs everywhere. Parameters get their
PartitionSpec from the logical axis names of their Linear (`layers.Linear.axes`) or, for the plain
params (embedding, lm_head, expert stacks, norms), from their name. The layer functions in layers.py
read the mesh from the tracing context (`jax.set_mesh`, set by the runner) and open `shard_map`s where
the collective pattern must be explicit (attention per head shard, vocab-parallel embedding, MoE);
everything else (column / row-parallel matmuls, the all-reduce after o_proj and down_proj) is left
to GSPMD propagation from the parameters' shardings.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.quantized_matmul import QuantizedArray

DATA, MODEL = "data", "model"


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over the first dp * tp devices (or `devices`)."""
    n = tensor_parallel_size * data_parallel_size
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} x data_parallel_size {data_parallel_size} "
                         f"needs {n} devices, this host has {len(devices)} ({devices[0].platform})")
    grid = np.array(devices[:n], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def check_tensor_parallel(config, n: int) -> None:
    """Start-up check: every device must get whole query heads."""
    if config.num_heads % n:
        raise ValueError(f"tensor_parallel_size {n} does not divide the model's {config.num_heads} query heads")


def model_axis_size() -> int:
    """Size of the "model" axis of the mesh being traced under (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or MODEL not in mesh.axis_names else mesh.shape[MODEL]


def kv_heads_sharded(num_kv_heads: int, n: int) -> bool:
    """KV heads split over the model axis, or (fewer heads than devices, or not a multiple) replicated,
    as vLLM does; each device then holds every KV head and its query heads pick theirs."""
    return n > 1 and num_kv_heads % n == 0


def vocab_sharded(vocab_size: int, n: int) -> bool:
    return n > 1 and vocab_size % n == 0


def _rules(config, n: int, expert_parallel: bool) -> dict[str | None, str | None]:
    return {"heads": MODEL, "kv_heads": MODEL if kv_heads_sharded(config.num_kv_heads, n) else None,
            "mlp": MODEL, "expert_mlp": None if expert_parallel else MODEL,
            "vocab": MODEL if vocab_sharded(config.vocab_size, n) else None,
            "experts": MODEL if expert_parallel else None, "embed": None, None: None}


# Logical axes of the params that are not a Linear, by attribute name.
_PLAIN_AXES = {"embed_tokens": ("vocab", "embed"), "lm_head": ("embed", "vocab"),
               "experts_gate": ("experts", "embed", "expert_mlp"),
               "experts_up": ("experts", "embed", "expert_mlp"), "experts_down": ("experts", "expert_mlp", "embed")}


def _logical_axes(module, leaf: str, ndim: int) -> tuple:
    from models.layers import Linear
    if isinstance(module, Linear) and module.axes:
        axes = module.axes if leaf == "weight" else module.axes[-1:]
    else:
        axes = _PLAIN_AXES.get(leaf, ())
    return (None,) * (ndim - len(axes)) + tuple(axes)  # a leading stacked-layer axis is never split


def param_partition_specs(model, n: int, expert_parallel: bool = False) -> dict[tuple, P]:
    """nnx state path -> PartitionSpec of every parameter of a DecoderLM for a model axis of size n.
    A dimension the axis does not divide stays whole (replicated)."""
    from flax import nnx
    rules = _rules(model.config, n, expert_parallel)
    if expert_parallel and model.config.num_experts % n:
        raise ValueError(f"expert parallel over {n} devices needs a multiple of {n} experts, "
                         f"the model has {model.config.num_experts}")
    specs = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        module = model
        for p in path[:-1]:
            module = module[p] if isinstance(p, int) else getattr(module, p)
        value = var.get_value()
        if isinstance(value, QuantizedArray):
            specs[path] = _quantized_specs(value, _logical_axes(module, path[-1], 2), path[-1], rules, n)
            continue
        axes = _logical_axes(module, path[-1], len(value.shape))
        specs[path] = _spec(axes, value.shape, rules, n)
    return specs


def _spec(axes, shape, rules, n: int) -> P:
    mesh_axes = [rules.get(a) for a in axes]
    return P(*[a if a is None or dim % n == 0 else None for a, dim in zip(mesh_axes, shape)])


def _quantized_specs(w: QuantizedArray, axes, leaf: str, rules, n: int) -> QuantizedArray:
    """Specs of a quantized weight [..., out, packed in]: split over its output rows as the float weight
    would be (column-parallel q/k/v/gate/up, vocab-parallel head); the packed input axis stays whole,
    so a row-parallel o/down is replicated (its blocks would have to split on block boundaries)."""
    rows = axes[0] if leaf == "embed_tokens" else axes[-1]
    lead = (None,) * (w.data.ndim - 2)
    data = _spec(lead + (rows, None), w.data.shape, rules, n)
    scale = None if w.scale is None else _spec(lead + (rows,), w.scale.shape, rules, n)
    return dataclasses.replace(w, data=data, scale=scale, layer=None)


def shard_model(model, mesh: Mesh, expert_parallel: bool = False) -> None:
    """Moves every parameter of `model` to its NamedSharding on `mesh` (in place)."""
    from flax import nnx
    n = mesh.shape[MODEL]
    specs = param_partition_specs(model, n, expert_parallel)
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        put = jax.tree.map(lambda p: NamedSharding(mesh, p), specs[path], is_leaf=lambda x: isinstance(x, P))
        var.set_value(jax.device_put(var.get_value(), put))
    nnx.update(model, state)


def pool_spec(config, n: int) -> P:
    """The KV pool [L, pages, page_size, 2*Hkv, D] is split along its interleaved head axis in blocks of
    2*Hkv/n: a block holds whole (K, V) pairs of consecutive heads, so each device keeps its heads' K and V
    together and the GQA mapping of its query heads is the same locally as globally."""
    return P(None, None, None, MODEL if kv_heads_sharded(config.num_kv_heads, n) else None, None)


def bytes_per_device(arrays) -> dict:
    """Device -> bytes of the shards of `arrays` (a pytree of jax.Arrays) held there."""
    out: dict = collections.defaultdict(int)
    for a in jax.tree.leaves(arrays):
        for shard in a.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return dict(out)


# Logical axes of each canonical weight (models/transformer.py), for loading straight into shards; the
# same names the modules carry (tests check the two agree). Stacked "layers.*" weights lead with L.
CANONICAL_AXES = {
    "embed_tokens": ("vocab", "embed"), "lm_head": ("embed", "vocab"),
    "layers.q_proj": ("embed", "heads"), "layers.k_proj": ("embed", "kv_heads"),
    "layers.v_proj": ("embed", "kv_heads"), "layers.o_proj": ("heads", "embed"),
    "layers.q_bias": ("heads",), "layers.k_bias": ("kv_heads",), "layers.v_bias": ("kv_heads",),
    "layers.gate_proj": ("embed", "mlp"), "layers.up_proj": ("embed", "mlp"), "layers.down_proj": ("mlp", "embed"),
    "layers.router": ("embed", None), **{f"layers.{k}": v for k, v in _PLAIN_AXES.items() if k.startswith("experts")},
}


def canonical_specs(config, n: int) -> dict[str, P]:
    """Canonical weight name -> PartitionSpec for a model axis of size n (see param_partition_specs)."""
    from models.transformer import param_specs
    check_tensor_parallel(config, n)
    rules = _rules(config, n, config.expert_parallel)
    out = {}
    for name, spec in param_specs(config).items():
        axes = CANONICAL_AXES.get(name, ())
        axes = (None,) * (len(spec.shape) - len(axes)) + tuple(axes)
        out[name] = P(*[rules.get(a) if rules.get(a) is None or dim % n == 0 else None
                        for a, dim in zip(axes, spec.shape)])
    return out


def canonical_placement(config, mesh: Mesh):
    """Canonical weight name -> NamedSharding on `mesh`: what the loaders device_put each weight into."""
    specs = canonical_specs(config, mesh.shape[MODEL])
    return lambda name: NamedSharding(mesh, specs[name])
