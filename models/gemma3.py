"""Gemma 3 (text): Gemma 2's blocks without soft-caps, plus q/k norms, and a `layer_types` pattern of
sliding and full layers whose rope differs (local base for sliding layers, global base and scaling
for full ones); the scan carries each layer's window and rope table."""

from __future__ import annotations

from models import gemma2
from models.registry import Family


def hf_config(cfg) -> dict:
    n = int(cfg["num_hidden_layers"])
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                       for i in range(n)]
    rope = cfg.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    return {**gemma2.COMMON, "qk_norm": True, "layer_types": tuple(types), "local_rope_theta": float(local),
            "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar") or cfg["head_dim"]),
            "attn_logit_softcap": cfg.get("attn_logit_softcapping"),
            "final_logit_softcap": cfg.get("final_logit_softcapping")}


def gguf_config(meta) -> dict:
    # llama.cpp's gemma3: every 6th layer global, local rope base 10000, scale 1/sqrt(head_dim).
    n = int(meta["gemma3.block_count"])
    return {**gemma2.COMMON, "qk_norm": True, "local_rope_theta": 10000.0,
            "layer_types": tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)),
            "query_pre_attn_scalar": float(meta["gemma3.attention.key_length"]), **gemma2.chat_eos(meta)}


def hf_weights(c) -> dict:
    return dict(gemma2.HF_NAMES)


# Gemma3ForConditionalGeneration checkpoints: the text model's config is config["text_config"] and its
# tensors sit under another prefix (models.registry.load_hf_dir finds which); the vision tower is ignored.
FAMILY = Family("gemma3", hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), gguf_architectures=("gemma3",),
                hf_weights=hf_weights, gguf_weights=gemma2.gguf_weights,
                hf_config=hf_config, gguf_config=gguf_config)
