"""Qwen2 / Qwen2.5: the Llama decoder with q/k/v biases (always on in HF's Qwen2), tied or untied head."""

from __future__ import annotations

from models import llama
from models.registry import Family

FAMILY = Family("qwen2", hf_architectures=("Qwen2ForCausalLM",), gguf_architectures=("qwen2",),
                hf_weights=llama.hf_weights, gguf_weights=lambda c: dict(llama.GGUF_NAMES),
                hf_config=lambda cfg: {"attention_bias": True}, gguf_config=lambda meta: {"attention_bias": True})
