"""Qwen3-MoE: Qwen3 attention (q/k norms) with top-k routed experts; `mlp_only_layers` and
`decoder_sparse_step` leave some layers dense (they become their own scan groups)."""

from __future__ import annotations

from models import llama
from models.registry import Family


def hf_config(cfg) -> dict:
    return {"qk_norm": True, "attention_bias": bool(cfg.get("attention_bias", False)),
            "num_experts": int(cfg.get("num_experts") or cfg["num_local_experts"]), "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
            "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", True)),
            "mlp_only_layers": tuple(cfg.get("mlp_only_layers") or ()),
            "decoder_sparse_step": int(cfg.get("decoder_sparse_step", 1))}


FAMILY = Family("qwen3_moe", hf_architectures=("Qwen3MoeForCausalLM",), gguf_architectures=("qwen3moe",),
                hf_weights=llama.hf_weights, gguf_weights=lambda c: dict(llama.GGUF_NAMES), hf_config=hf_config,
                # llama.cpp's qwen3moe: every layer MoE, top-k weights renormalized.
                gguf_config=lambda meta: {"qk_norm": True, "norm_topk_prob": True})
