"""Offline throughput, like `vllm bench throughput`.

  python benchmarks/throughput.py --dataset sharegpt --num-prompts 64 --output-len 64 --ignore-eos
  python benchmarks/throughput.py --dataset random --input-len 256 --output-len 64 --compare-hf

Prints requests/s, output tok/s, total tok/s, engine start-up (load + compile) time and peak RSS, and
per-device parameter / KV pool bytes. `--tensor-parallel-size N` / `--data-parallel-size M` shard the
model (on CPU, `--simulate-devices K` sets XLA_FLAGS=--xla_force_host_platform_device_count=K first).
`--compare-hf` (needs torch) also runs HF transformers' batched `generate` on the same prompts in fp32
static batches (`--hf-batch-size`, default 16) and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.datasets import sample_random, sample_sharegpt  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jaxllm(args, requests) -> dict:
    from jaxllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              data_parallel_size=args.data_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
              **({"kv_cache_memory": args.kv_cache_memory} if args.kv_cache_memory else {}))
    startup = time.perf_counter() - t0
    params = [SamplingParams(temperature=args.temperature, max_tokens=r.output_len, ignore_eos=args.ignore_eos)
              for r in requests]
    prompts = [{"prompt_token_ids": r.prompt} if isinstance(r.prompt, list) else r.prompt for r in requests]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - t0
    stats = llm.engine.get_stats()
    per_device = llm.engine.runner.bytes_per_device()  # replica 0's devices under data parallel
    return {
        "tensor_parallel_size": args.tensor_parallel_size, "data_parallel_size": args.data_parallel_size,
        "param_mib_per_device": max(per_device["params"].values()) / 2**20,
        "pool_mib_per_device": max(per_device["pool"].values()) / 2**20,
        "engine": "jaxllm", "elapsed_s": elapsed, "startup_s": startup, "warmup_compile_s": stats.warmup_seconds,
        "num_compiles": stats.num_compiles, "recompiles_after_warmup": stats.num_recompiles_after_warmup,
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs),
        "num_preemptions": stats.num_preemptions_total,
    }


def run_hf(args, requests) -> dict:
    """HF transformers baseline: static fp32 batches, left padding, greedy, exactly output_len new tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import models

    torch.set_num_threads(os.cpu_count() or 1)
    path = args.model or models.default_model_path()
    kwargs = {"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {}
    src = os.path.dirname(path) if path.endswith(".gguf") else path
    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, **kwargs).eval()
    out_tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(requests), args.hf_batch_size):
        chunk = requests[i:i + args.hf_batch_size]
        if isinstance(chunk[0].prompt, list):
            width = max(len(r.prompt) for r in chunk)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r.prompt)) + r.prompt for r in chunk])
            mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in chunk])
        else:
            enc = tok([r.prompt for r in chunk], return_tensors="pt", padding=True)
            ids, mask = enc.input_ids, enc.attention_mask
        new = max(r.output_len for r in chunk)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new if args.ignore_eos else 0, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        out_tokens += sum(min(r.output_len, gen.shape[1] - ids.shape[1]) for r in chunk)
    elapsed = time.perf_counter() - t0
    return {"engine": "hf-transformers", "elapsed_s": elapsed,
            "prompt_tokens": sum(r.prompt_len for r in requests), "output_tokens": out_tokens}


def report(result: dict, num_requests: int) -> dict:
    e = result["elapsed_s"]
    result.update(requests_per_s=num_requests / e, output_tok_per_s=result["output_tokens"] / e,
                  total_tok_per_s=(result["prompt_tokens"] + result["output_tokens"]) / e,
                  peak_rss_mib=peak_rss_mib())
    print(f"[{result['engine']}] {num_requests} requests in {e:.2f}s: {result['requests_per_s']:.2f} req/s, "
          f"{result['output_tok_per_s']:.1f} output tok/s, {result['total_tok_per_s']:.1f} total tok/s, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB"
          + (f", start-up {result['startup_s']:.1f}s (compile {result['warmup_compile_s']:.1f}s, "
             f"{result['num_compiles']} programs, {result['recompiles_after_warmup']} recompiles)"
             if "startup_s" in result else "")
          + (f", TP {result['tensor_parallel_size']} x DP {result['data_parallel_size']}: params "
             f"{result['param_mib_per_device']:.1f} MiB + KV pool {result['pool_mib_per_device']:.1f} MiB per device"
             if "param_mib_per_device" in result else ""), flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--tokenizer", default=None, help="default: the model's own")
    ap.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256, help="random dataset prompt length")
    ap.add_argument("--output-len", type=int, default=None, help="fixed output length (default: dataset's)")
    ap.add_argument("--random-vocab-size", type=int, default=None,
                    help="random dataset: ids below this (default: the tokenizer's vocabulary)")
    ap.add_argument("--random-range-ratio", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    ap.add_argument("--enable-expert-parallel", action="store_true")
    ap.add_argument("--kv-cache-memory", default=None, help="bytes for the KV pool per device (512MiB, ...)")
    ap.add_argument("--simulate-devices", type=int, default=None, help="CPU: this many simulated devices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-hf", action="store_true")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--skip-jaxllm", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    if args.simulate_devices:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.simulate_devices}")
    if args.kv_cache_memory:
        from jaxllm.config import parse_bytes
        args.kv_cache_memory = parse_bytes(args.kv_cache_memory)

    from jaxllm.tokenizer import load_tokenizer
    import models

    tokenizer = load_tokenizer(args.tokenizer or args.model or models.default_model_path())
    if args.dataset == "sharegpt":
        requests = sample_sharegpt(tokenizer, args.num_prompts, output_len=args.output_len, seed=args.seed)
    else:
        requests = sample_random(args.random_vocab_size or tokenizer.vocab_size, args.num_prompts, args.input_len, args.output_len or 128,
                                 seed=args.seed, range_ratio=args.random_range_ratio)
    print(f"{len(requests)} prompts, {sum(r.prompt_len for r in requests)} prompt tokens, "
          f"{sum(r.output_len for r in requests)} output tokens requested", flush=True)
    results = []
    if not args.skip_jaxllm:
        results.append(report(run_jaxllm(args, requests), len(requests)))
    if args.compare_hf:
        results.append(report(run_hf(args, requests), len(requests)))
        if len(results) == 2:
            print(f"jaxllm / HF output tok/s: {results[0]['output_tok_per_s'] / results[1]['output_tok_per_s']:.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
