"""Host time per engine step over a long generation: it must stay flat (no per-step work proportional
to what a sequence has generated so far), with and without async scheduling.

  python benchmarks/host_overhead.py --num-seqs 64 --output-len 1000 [--async-scheduling] [--model DIR]

Defaults to the tiny random Llama checkpoint in tests/data, whose forward is cheap, so the host's share
of a step is what the numbers show. Prints host ms/step (scheduling, input building, applying tokens,
outputs) and device-wait ms/step per window of steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--model", default=os.path.join(root, "tests", "data", "tiny-llama"))
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=1000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--async-scheduling", action="store_true")
    ap.add_argument("--penalties", action="store_true", help="every request uses presence/frequency penalties")
    args = ap.parse_args(argv)

    import models
    from jaxllm import LLM, SamplingParams
    from jaxllm.engine.engine import StepTiming
    from jaxllm.sampling_params import RequestOutputKind

    llm = LLM(args.model, tokenizer=models.default_model_path(), max_num_seqs=args.num_seqs,
              max_num_batched_tokens=max(256, args.num_seqs), max_model_len=args.output_len + 64,
              async_scheduling=args.async_scheduling)
    eng = llm.engine
    eng.timing = StepTiming(window=10**9)
    extra = dict(presence_penalty=0.5, frequency_penalty=0.2) if args.penalties else {}
    for i in range(args.num_seqs):
        eng.add_request(str(i), None, SamplingParams(temperature=0.8, seed=i, max_tokens=args.output_len,
                                                     ignore_eos=True, output_kind=RequestOutputKind.DELTA, **extra),
                        prompt_token_ids=[5 + i % 400] * 16)
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    wall = time.perf_counter() - t0
    host, wait = eng.timing.host, eng.timing.wait
    print(f"{steps} steps, {wall:.1f} s, async_scheduling={args.async_scheduling}")
    print(f"{'steps':>12}  {'host ms/step':>12}  {'device wait ms/step':>19}")
    for a in range(0, len(host), args.window):
        h, w = host[a:a + args.window], wait[a:a + args.window]
        print(f"{a:>5}-{a + len(h) - 1:<6}  {1e3 * sum(h) / len(h):>12.2f}  {1e3 * sum(w) / len(w):>19.2f}")
    print(f"mean host {1e3 * sum(host) / len(host):.2f} ms/step, mean device wait {1e3 * sum(wait) / len(wait):.2f} "
          f"ms/step, {args.num_seqs * args.output_len / wall:.0f} output tok/s")


if __name__ == "__main__":
    main()
