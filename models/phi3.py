"""Phi-3 / Phi-3.5: the Llama decoder with fused qkv_proj and gate_up_proj, split at load."""

from __future__ import annotations

from models import llama
from models.loading.weights import Source
from models.registry import Family


def _split(c, hf: bool) -> dict:
    qd, kvd, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    qkv = "model.layers.{i}.self_attn.qkv_proj.weight" if hf else "blk.{i}.attn_qkv.weight"
    # llama.cpp keeps Phi-3's fused gate_up as ffn_up [2I, H], gate first as in HF.
    gate_up = "model.layers.{i}.mlp.gate_up_proj.weight" if hf else "blk.{i}.ffn_up.weight"
    part = lambda name, a, b, total: Source(name, lambda w, a=a, b=b: w[a:b], total)
    return {"layers.q_proj": part(qkv, 0, qd, qd + 2 * kvd),
            "layers.k_proj": part(qkv, qd, qd + kvd, qd + 2 * kvd),
            "layers.v_proj": part(qkv, qd + kvd, qd + 2 * kvd, qd + 2 * kvd),
            "layers.gate_proj": part(gate_up, 0, inter, 2 * inter),
            "layers.up_proj": part(gate_up, inter, 2 * inter, 2 * inter)}


def hf_config(cfg) -> dict:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if float(rope.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0) != 1.0:
        raise NotImplementedError("partial rotary embeddings (Phi-4-mini) are not supported yet")
    if rope.get("rope_type", rope.get("type")) not in ("longrope", "su"):
        return {}
    # LongRoPE (Phi-3-128k, Phi-3.5): the original context lives at the top level of the config.
    rope.pop("rope_theta", None)
    orig = rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
    return {"rope_scaling": {**rope, "rope_type": "longrope", "original_max_position_embeddings": int(orig),
                             "short_factor": tuple(rope["short_factor"]), "long_factor": tuple(rope["long_factor"])}}


FAMILY = Family("phi3", hf_architectures=("Phi3ForCausalLM",), gguf_architectures=("phi3",),
                hf_weights=lambda c: {**llama.HF_NAMES, **_split(c, True)},
                gguf_weights=lambda c: {**llama.GGUF_NAMES, **_split(c, False)}, hf_config=hf_config)
