"""Golden pooled hidden states for tests/test_embeddings.py, computed by HF transformers (needs torch:
`pip install -e .[golden]`): the final-normed last hidden state of AutoModel, last-token and mean
pooled, L2-normalized, for the tiny random Llama and for SmolLM2 (its GGUF dequantized by transformers).

  python scripts/make_embedding_golden.py   # writes tests/data/goldens/embeddings.json
"""

import json
import os

import numpy as np
import torch
from transformers import AutoModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [3, 4], [100, 7, 300, 45, 12]]


def pooled(model, ids):
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
    out = {}
    for name, vec in (("last", h[-1]), ("mean", h.mean(0))):
        out[name] = (vec / np.linalg.norm(vec)).tolist()
    return out


def main():
    import models
    golden = {"prompts": PROMPTS}
    tiny = AutoModel.from_pretrained(os.path.join(ROOT, "tests", "data", "tiny-llama"), torch_dtype=torch.float32)
    golden["tiny-llama"] = [pooled(tiny, p) for p in PROMPTS]
    gguf = models.default_model_path()
    smol = AutoModel.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), torch_dtype=torch.float32)
    golden["smollm2"] = [pooled(smol, p) for p in PROMPTS]
    with open(os.path.join(ROOT, "tests", "data", "goldens", "embeddings.json"), "w") as f:
        json.dump(golden, f)


if __name__ == "__main__":
    main()
