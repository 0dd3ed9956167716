"""Llama family (Llama 2/3/3.1, SmolLM2, Mistral incl. its sliding window): the plain decoder.

Also the checkpoint names most families share: HF's `model.layers.{i}.self_attn.q_proj.weight` and
llama.cpp's `blk.{i}.attn_q.weight`; other family files start from these and change what differs.
"""

from __future__ import annotations

from models.config import TransformerConfig
from models.loading.gguf import unpermute_qk
from models.loading.weights import Source
from models.registry import Family
from models.transformer import DecoderLM, random_weights, weight_shapes  # noqa: F401  (re-exported)

LlamaForCausalLM = DecoderLM  # the Llama family has no options of its own

# Canonical name -> tensor name in a HF checkpoint ("{i}" = layer index, "{e}" = expert).
HF_NAMES = {
    "embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
    "layers.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers.{p}_proj": f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"layers.{p}_bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"},
    "layers.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    **{f"layers.{p}_proj": f"model.layers.{{i}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    # Qwen-MoE naming of experts; Mixtral overrides these.
    "layers.router": "model.layers.{i}.mlp.gate.weight",
    **{f"layers.experts_{p}": f"model.layers.{{i}}.mlp.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# ... and in a llama.cpp GGUF (its converter's names; experts come stacked, [E, out, in]).
GGUF_NAMES = {
    "embed_tokens": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight",
    "layers.attn_norm": "blk.{i}.attn_norm.weight", "layers.mlp_norm": "blk.{i}.ffn_norm.weight",
    "layers.q_proj": "blk.{i}.attn_q.weight", "layers.k_proj": "blk.{i}.attn_k.weight",
    "layers.v_proj": "blk.{i}.attn_v.weight", "layers.o_proj": "blk.{i}.attn_output.weight",
    "layers.q_bias": "blk.{i}.attn_q.bias", "layers.k_bias": "blk.{i}.attn_k.bias",
    "layers.v_bias": "blk.{i}.attn_v.bias",
    "layers.q_norm": "blk.{i}.attn_q_norm.weight", "layers.k_norm": "blk.{i}.attn_k_norm.weight",
    "layers.gate_proj": "blk.{i}.ffn_gate.weight", "layers.up_proj": "blk.{i}.ffn_up.weight",
    "layers.down_proj": "blk.{i}.ffn_down.weight",
    "layers.router": "blk.{i}.ffn_gate_inp.weight",
    "layers.experts_gate": "blk.{i}.ffn_gate_exps.weight", "layers.experts_up": "blk.{i}.ffn_up_exps.weight",
    "layers.experts_down": "blk.{i}.ffn_down_exps.weight",
}


def hf_weights(c: TransformerConfig) -> dict:
    return dict(HF_NAMES)


def gguf_weights(c: TransformerConfig) -> dict:
    """llama.cpp's converter reorders q/k rows of llama-arch models for its rope: put them back."""
    return {**GGUF_NAMES,
            "layers.q_proj": Source(GGUF_NAMES["layers.q_proj"], lambda w: unpermute_qk(w, c.num_heads)),
            "layers.k_proj": Source(GGUF_NAMES["layers.k_proj"], lambda w: unpermute_qk(w, c.num_kv_heads))}


FAMILY = Family("llama", hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
                gguf_architectures=("llama",), hf_weights=hf_weights, gguf_weights=gguf_weights)
