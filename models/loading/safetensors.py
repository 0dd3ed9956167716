"""Hugging Face checkpoint directories: config.json + model.safetensors or sharded model-*.safetensors."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Callable, Iterator, Mapping

import numpy as np

from models.loading.errors import CheckpointError, CheckpointNotFoundError


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e


def weight_files(path: str) -> dict[str, str]:
    """Tensor name -> the .safetensors file holding it (from the shard index when there is one)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
        for fname in sorted(set(files.values())):
            if not os.path.isfile(fname):
                raise CheckpointNotFoundError(f"{index}: lists shard {os.path.basename(fname)}, which is missing")
        return files
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise CheckpointNotFoundError(f"{path}: no *.safetensors weight files")
    from safetensors import safe_open
    files = {}
    for fname in shards:
        with safe_open(fname, framework="np") as f:
            files.update({name: fname for name in f.keys()})
    return files


@contextlib.contextmanager
def tensor_getter(path: str) -> Iterator[Callable[[str], np.ndarray | None]]:
    """Yields get(name) -> ndarray (None if no shard has it); shard files stay open meanwhile."""
    from safetensors import safe_open
    files = weight_files(path)
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}

        def get(name: str):
            fname = files.get(name)
            if fname is None:
                return None
            if fname not in handles:
                handles[fname] = stack.enter_context(safe_open(fname, framework="np"))
            return handles[fname].get_tensor(name)

        yield get


def load_weights(path: str, config, specs: Mapping, sources: Mapping, dtype, finalize=None) -> dict[str, np.ndarray]:
    """Canonical stacked weights of an HF directory (see models.loading.weights.assemble)."""
    from models.loading.weights import assemble
    with tensor_getter(path) as get:
        return assemble(config, specs, sources, get, path, dtype, finalize)
