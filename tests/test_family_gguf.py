"""GGUF checkpoints of the issue-9 families: our tiny HF checkpoints converted the way llama.cpp's
convert_hf_to_gguf.py names and transforms tensors (Gemma norms + 1, fused Phi-3 tensors kept fused,
experts stacked, q/k permuted only for llama-arch Mixtral), then loaded and compared with the same
weights loaded from safetensors."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

import models
from tests.test_loading import Q, llamacpp_permute, write_gguf
from tests.test_models import DATA, PagedRunner

ARCH = {"tiny-qwen2": "qwen2", "tiny-qwen3": "qwen3", "tiny-gemma2": "gemma2", "tiny-gemma3": "gemma3",
        "tiny-phi3": "phi3", "tiny-phi3-longrope": "phi3", "tiny-mixtral": "llama", "tiny-qwen3-moe": "qwen3moe"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.gate_up_proj": "ffn_up", "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp"}
GEMMA_LAYER = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
EXPERT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def hf_to_gguf(name: str, out) -> str:
    hf_dir = os.path.join(DATA, name)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    arch, gemma = ARCH[name], name.startswith("tiny-gemma")
    hf = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            hf.update(load_file(os.path.join(hf_dir, f)))
    tensors, experts = {}, {}
    for key, x in hf.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight", key)
        if m:
            experts.setdefault((int(m[1]), EXPERT[m[3]]), {})[int(m[2])] = x
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            part = {**LAYER, **GEMMA_LAYER}[m[2]] if gemma and m[2] in GEMMA_LAYER else LAYER[m[2]]
            gname = f"blk.{m[1]}.{part}.{m[3]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[key]
        if gemma and gname.endswith("norm.weight"):
            x = x + np.float32(1.0)  # llama.cpp's Gemma norms have no (1 + w) offset
        if arch == "llama" and ".attn_q.weight" in gname:
            x = llamacpp_permute(x, cfg["num_attention_heads"])
        if arch == "llama" and ".attn_k.weight" in gname:
            x = llamacpp_permute(x, cfg["num_key_value_heads"])
        tensors[gname] = (x, Q.F32)
    for (i, part), per in experts.items():
        tensors[f"blk.{i}.ffn_{part}_exps.weight"] = (np.stack([per[e] for e in sorted(per)]), Q.F32)
    rope = cfg["rope_parameters"].get("full_attention", cfg["rope_parameters"])
    meta = {f"{arch}.block_count": cfg["num_hidden_layers"], f"{arch}.embedding_length": cfg["hidden_size"],
            f"{arch}.feed_forward_length": cfg["intermediate_size"],
            f"{arch}.attention.head_count": cfg["num_attention_heads"],
            f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
            f"{arch}.attention.key_length": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            f"{arch}.vocab_size": cfg["vocab_size"], f"{arch}.rope.freq_base": float(rope["rope_theta"]),
            f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
            f"{arch}.context_length": cfg["max_position_embeddings"]}
    if rope.get("rope_type") == "longrope":  # llama.cpp: factors as tensors, the scale as metadata
        tensors["rope_factors_long.weight"] = (np.asarray(rope["long_factor"], np.float32), Q.F32)
        tensors["rope_factors_short.weight"] = (np.asarray(rope["short_factor"], np.float32), Q.F32)
        orig = cfg["original_max_position_embeddings"]
        meta[f"{arch}.rope.scaling.original_context_length"] = orig
        meta[f"{arch}.rope.scaling.attn_factor"] = float(np.sqrt(1 + np.log(cfg["max_position_embeddings"] / orig)
                                                                 / np.log(orig)))
    if rope.get("rope_type") == "linear":
        meta.update({f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": float(rope["factor"])})
    if cfg.get("sliding_window"):
        meta[f"{arch}.attention.sliding_window"] = cfg["sliding_window"]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key):
            meta[f"{arch}.{key}"] = float(cfg[key])
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        meta[f"{arch}.expert_count"] = cfg.get("num_local_experts") or cfg.get("num_experts")
        meta[f"{arch}.expert_used_count"] = cfg["num_experts_per_tok"]
        if cfg.get("moe_intermediate_size"):
            meta[f"{arch}.expert_feed_forward_length"] = cfg["moe_intermediate_size"]
    return write_gguf(out, tensors, arch=arch, meta=meta)


def _gguf_semantics(name: str, hf_config):
    """What llama.cpp assumes where GGUF metadata is silent; the HF model is compared under the same."""
    c = hf_config
    if name == "tiny-gemma3":  # every 6th layer global, scale 1/sqrt(head_dim)
        types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(c.num_layers))
        return dataclasses.replace(c, layer_types=types, query_pre_attn_scalar=float(c.head_dim))
    if name == "tiny-gemma2":
        return dataclasses.replace(c, query_pre_attn_scalar=float(c.head_dim))
    if name == "tiny-qwen3-moe":  # llama.cpp's qwen3moe always renormalizes the top-k weights
        return dataclasses.replace(c, norm_topk_prob=True)
    return c


@pytest.mark.parametrize("name", sorted(ARCH))
def test_gguf_family_matches_safetensors(tmp_path, name):
    hf = models.load_model(os.path.join(DATA, name))
    gg = models.load_model(hf_to_gguf(name, tmp_path / f"{name}.gguf"))
    want_cfg = _gguf_semantics(name, hf.config)
    for field in ("attention_bias", "qk_norm", "norm_offset", "sandwich_norm", "embed_scale", "num_experts",
                  "num_experts_per_tok", "mlp_only_layers", "norm_topk_prob", "attn_logit_softcap", "final_logit_softcap",
                  "tie_word_embeddings", "head_dim"):
        assert getattr(gg.config, field) == getattr(want_cfg, field), field
    assert gg.config.layer_windows() == want_cfg.layer_windows()
    ref = models.DecoderLM(want_cfg, weights={k: np.asarray(v) for k, v in hf.model.canonical_weights().items()})
    prompt = [3, 17, 99, 120, 5, 61, 7, 200, 11, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]  # > window
    np.testing.assert_allclose(PagedRunner(gg.model).step([(0, prompt, 0)])[0],
                               PagedRunner(ref).step([(0, prompt, 0)])[0], atol=1e-4, rtol=1e-4)
    if "longrope" in name:  # past the original 64-token context: the long factors
        long_prompt = list(range(3, 83))
        np.testing.assert_allclose(PagedRunner(gg.model, pages_per_seq=12).step([(0, long_prompt, 0)])[0],
                                   PagedRunner(ref, pages_per_seq=12).step([(0, long_prompt, 0)])[0],
                                   atol=1e-4, rtol=1e-4)


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration: config.text_config + tensors under model.language_model.*
    (transformers 5's layout); vision tensors are ignored."""
    from safetensors.numpy import save_file
    src = os.path.join(DATA, "tiny-gemma3")
    cfg = json.load(open(os.path.join(src, "config.json")))
    wrapped = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
               "text_config": {**cfg, "architectures": None}, "vision_config": {"hidden_size": 8}}
    os.makedirs(tmp_path / "mm")
    json.dump(wrapped, open(tmp_path / "mm" / "config.json", "w"))
    tensors = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
               for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    tensors["model.vision_tower.patch.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(tmp_path / "mm" / "model.safetensors"))
    mm = models.load_model(str(tmp_path / "mm"))
    text = models.load_model(src)
    assert mm.config.layer_windows() == text.config.layer_windows()
    prompt = [3, 17, 99, 120, 5]
    np.testing.assert_allclose(PagedRunner(mm.model).step([(0, prompt, 0)])[0],
                               PagedRunner(text.model).step([(0, prompt, 0)])[0], atol=1e-6)
