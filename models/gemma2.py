"""Gemma 2: (1 + w) RMSNorms, norms before and after attention and MLP, embeddings scaled by
sqrt(hidden), gelu-tanh MLP, query_pre_attn_scalar, attention and final logit soft-caps, alternating
sliding-window and global layers. Gemma 3 (gemma3.py) reuses all of this."""

from __future__ import annotations

from models import llama
from models.loading.weights import shifted
from models.registry import Family

HF_NAMES = {**llama.HF_NAMES,
            "layers.attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
            "layers.mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
            "layers.mlp_post_norm": "model.layers.{i}.post_feedforward_layernorm.weight"}
GGUF_NAMES = {**llama.GGUF_NAMES,
              "layers.attn_post_norm": "blk.{i}.post_attention_norm.weight",
              "layers.mlp_post_norm": "blk.{i}.post_ffw_norm.weight"}

COMMON = {"norm_offset": 1.0, "hidden_act": "gelu_tanh", "sandwich_norm": True, "embed_scale": True}


def gguf_weights(c) -> dict:
    """llama.cpp's converter adds 1 to every Gemma norm weight (its RMSNorm has no offset): undo it."""
    return {k: shifted(v, -1.0) if k.endswith("norm") else v for k, v in GGUF_NAMES.items()}


def hf_config(cfg) -> dict:
    types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                       for i in range(int(cfg["num_hidden_layers"]))]
    return {**COMMON, "layer_types": tuple(types),
            "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar") or cfg["head_dim"]),
            "attn_logit_softcap": cfg.get("attn_logit_softcapping"),
            "final_logit_softcap": cfg.get("final_logit_softcapping")}


def chat_eos(meta) -> dict:
    """Gemma's chat turns end with <end_of_turn>, not <eos>: both stop generation (HF's
    generation_config lists both; GGUF metadata only <eos>)."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos = meta.get("tokenizer.ggml.eos_token_id")
    turn = [i for i, t in enumerate(tokens[:1024]) if t == "<end_of_turn>"]
    return {"eos_token_id": tuple(dict.fromkeys([eos, *turn]))} if eos is not None and turn else {}


def gguf_config(meta) -> dict:
    n = int(meta["gemma2.block_count"])
    # llama.cpp: even layers slide, odd ones are global; the attention scale is 1/sqrt(head_dim).
    return {**COMMON, "layer_types": tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)),
            "query_pre_attn_scalar": float(meta["gemma2.attention.key_length"]),
            "attn_logit_softcap": meta.get("gemma2.attn_logit_softcapping"),
            "final_logit_softcap": meta.get("gemma2.final_logit_softcapping"), **chat_eos(meta)}


FAMILY = Family("gemma2", hf_architectures=("Gemma2ForCausalLM",), gguf_architectures=("gemma2",),
                hf_weights=lambda c: dict(HF_NAMES), gguf_weights=gguf_weights,
                hf_config=hf_config, gguf_config=gguf_config)
