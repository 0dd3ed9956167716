"""Mixtral: the Llama/Mistral decoder with every MLP a top-k mixture of experts (weights renormalized).

In GGUF, llama.cpp writes Mixtral as a "llama" model with stacked expert tensors (models/llama.py).
"""

from __future__ import annotations

from models import llama
from models.registry import Family

_MOE = "model.layers.{i}.block_sparse_moe"


def hf_weights(c) -> dict:
    # HF's Mixtral experts: w1 = gate, w3 = up, w2 = down.
    return {**llama.HF_NAMES, "layers.router": f"{_MOE}.gate.weight",
            "layers.experts_gate": f"{_MOE}.experts.{{e}}.w1.weight",
            "layers.experts_up": f"{_MOE}.experts.{{e}}.w3.weight",
            "layers.experts_down": f"{_MOE}.experts.{{e}}.w2.weight"}


def hf_config(cfg) -> dict:
    return {"num_experts": int(cfg["num_local_experts"]), "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
            "moe_intermediate_size": int(cfg["intermediate_size"]), "norm_topk_prob": True}


FAMILY = Family("mixtral", hf_architectures=("MixtralForCausalLM",), gguf_architectures=(),
                hf_weights=hf_weights, hf_config=hf_config)
