"""Structured outputs' cost to a batch: output tok/s of 32 requests with none vs half of them JSON-schema
constrained, and the host time spent filling token masks.

  python benchmarks/structured.py [--num-prompts 32] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from jaxllm import LLM, SamplingParams, StructuredOutputsParams

    from jaxllm.engine.engine import StepTiming

    llm = LLM(max_num_seqs=args.num_prompts, max_model_len=512)
    eng = llm.engine
    eng.timing = StepTiming(window=10**9)
    prompts = [[{"role": "user", "content": f"Describe person number {i} as JSON."}] for i in range(args.num_prompts)]
    so = StructuredOutputsParams(json=SCHEMA)
    half = args.num_prompts // 2
    for _ in range(args.repeats):
        # Half constrained first; then the same requests unconstrained, each made to generate exactly as
        # many tokens as it did constrained, so both runs do the same work and only the masks differ.
        runs = {}
        lengths = None
        for label in ("half constrained", "none constrained"):
            if lengths is None:
                params = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                         structured_outputs=so if i < half else None)
                          for i in range(args.num_prompts)]
            else:
                params = [SamplingParams(temperature=0.8, seed=i, max_tokens=n, ignore_eos=True)
                          for i, n in enumerate(lengths)]
            eng.mask_seconds = 0.0
            steps0 = len(eng.timing.host)
            t0 = time.perf_counter()
            outs = llm.chat(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            lengths = lengths or [len(o.outputs[0].token_ids) for o in outs]
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            steps = len(eng.timing.host) - steps0
            runs[label] = tokens / dt
            print(f"{label:>17}: {tokens / dt:7.1f} output tok/s ({tokens} tokens, {dt:.1f} s, {steps} steps), "
                  f"mask filling {1e3 * eng.mask_seconds / max(1, steps):.2f} ms/step")
        print(f"constrained / unconstrained throughput: {runs['half constrained'] / runs['none constrained']:.1%}")


if __name__ == "__main__":
    main()
