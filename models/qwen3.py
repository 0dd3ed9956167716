"""Qwen3: per-head RMSNorm on q and k before rope, no biases, head_dim independent of hidden size."""

from __future__ import annotations

from models import llama
from models.registry import Family

FAMILY = Family("qwen3", hf_architectures=("Qwen3ForCausalLM",), gguf_architectures=("qwen3",),
                hf_weights=llama.hf_weights, gguf_weights=lambda c: dict(llama.GGUF_NAMES),
                hf_config=lambda cfg: {"qk_norm": True, "attention_bias": bool(cfg.get("attention_bias", False))},
                gguf_config=lambda meta: {"qk_norm": True})
