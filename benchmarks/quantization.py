"""Weight and KV-cache formats side by side (offline, one process):

  python benchmarks/quantization.py [--model M.gguf] [--quantization none,gguf,int8,fp8]
                                    [--kv-cache-dtype auto,int8,fp8] [--output-len 128]

Per weight format: parameter bytes, weight bytes read per decode step (every projection, the head and
the embedding rows looked up: a decode step reads each matmul weight once), single-stream TPOT
(greedy, `--output-len` tokens, median of `--repeats`), and output tok/s of 16 concurrent streams.
Per KV dtype: bytes per token and tokens per GiB of pool. One JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "Tell me a story about a dragon who learns to paint."


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def weight_bytes_per_decode_step(model) -> int:
    """Bytes of every parameter a one-token step reads: all of them but the embedding table, of which
    it reads one row (unless the table is also the tied head)."""
    from flax import nnx
    total = nbytes(nnx.state(model, nnx.Param))
    if model.lm_head is not None:
        table = nbytes(model.embed_tokens.get_value())
        total += table // model.config.vocab_size - table
    return total


def bench_weights(args, quantization: str | None) -> dict:
    from jaxllm import LLM, SamplingParams
    llm = LLM(args.model, quantization=quantization, max_num_seqs=16)
    model = llm.engine.loaded.model
    one = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=4), use_tqdm=False)
    tpots = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        llm.generate([PROMPT], one, use_tqdm=False)
        tpots.append((time.perf_counter() - t0) / args.output_len * 1000)
    batch = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([f"{PROMPT} Version {i}." for i in range(16)], batch, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    from flax import nnx
    return {"quantization": quantization or "none",
            "param_mib": nbytes(nnx.state(model, nnx.Param)) / 2**20,
            "weight_mib_per_decode_step": weight_bytes_per_decode_step(model) / 2**20,
            "tpot_ms_c1_median": statistics.median(tpots),
            "output_tok_s_c16": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed}


def bench_kv(args, kv_dtype: str) -> dict:
    from jaxllm import LLM
    llm = LLM(args.model, kv_cache_dtype=kv_dtype, max_num_seqs=2, warmup=False)
    runner = llm.engine.runner
    tokens = runner.pool_shape[1] * runner.pool_shape[2]
    per_token = runner.kv_pages.nbytes / tokens
    return {"kv_cache_dtype": kv_dtype, "bytes_per_token": per_token, "tokens_per_gib": 2**30 / per_token}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default="none,gguf,int8,fp8")
    p.add_argument("--kv-cache-dtype", default="auto,int8,fp8")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for q in filter(None, args.quantization.split(",")):
        print(json.dumps(bench_weights(args, None if q == "none" else q)), flush=True)
    for kv in filter(None, args.kv_cache_dtype.split(",")):
        print(json.dumps(bench_kv(args, kv)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
