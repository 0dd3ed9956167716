"""Batch job vs offline generate on the same requests and the same engine (not a timed test).

  python benchmarks/batch.py --num-prompts 1000 --output-len 64

ShareGPT prompts as /v1/completions lines through `jaxllm.run_batch` (reading, validation, bodies,
committed parts and the final assembly included), then the same prompts through `LLM.generate`; both
reuse one warmed-up engine. Prints output tok/s side by side and the ratio (target: batch within 10 %).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.datasets import sample_sharegpt  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args(argv)

    from jaxllm import LLM, SamplingParams, run_batch
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len)
    reqs = sample_sharegpt(llm.get_tokenizer(), args.num_prompts, output_len=args.output_len,
                           max_total_len=args.max_model_len)
    work = tempfile.mkdtemp(prefix="jaxllm-bench-batch-")
    with open(os.path.join(work, "in.jsonl"), "w") as f:
        for i, r in enumerate(reqs):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0,
                                         "ignore_eos": True}}) + "\n")
    out = os.path.join(work, "out.jsonl")
    llm.engine.reset_prefix_cache()
    t0 = time.perf_counter()
    assert run_batch.main(["-i", os.path.join(work, "in.jsonl"), "-o", out, "--no-progress"], engine=llm.engine) == 0
    batch_s = time.perf_counter() - t0
    batch_tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in open(out))

    llm.engine.reset_prefix_cache()
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt for r in reqs], params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    gen_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    result = {"num_prompts": len(reqs), "output_len": args.output_len,
              "run_batch": {"seconds": round(batch_s, 2), "output_tok_s": round(batch_tokens / batch_s, 1)},
              "generate": {"seconds": round(gen_s, 2), "output_tok_s": round(gen_tokens / gen_s, 1)}}
    result["batch_vs_generate"] = round(result["run_batch"]["output_tok_s"] / result["generate"]["output_tok_s"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
