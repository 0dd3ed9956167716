"""One process of a multi-host run (tests/test_multihost.py starts one per node rank); prints JSON results.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py '<spec json>'

spec: {"model": path, "flags": engine flags (nnodes, node_rank, master_port, tensor_parallel_size, ...),
       "prompts": [[ids]], "max_tokens": n, "step_sleep": s | absent}
Rank 0 prints {"ids", "logprobs", "preemptions", "compiles", "recompiles", "warmup_seconds"} of greedy
generation, or, when a step fails, {"error", "failed"} (the
request ids that were in flight) and exits 1. With step_sleep it prints a line "STEPPING" after its
first steps, then sleeps that long between steps, so that the test can kill rank 1 mid-generation.
Other ranks follow inside LLM(...) and exit with its code.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from jaxllm import LLM, SamplingParams  # noqa: E402


def main(spec: dict) -> int:
    llm = LLM(spec["model"], tokenizer=models.default_model_path(), **spec["flags"])  # ranks > 0 exit here
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=5)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    if "step_sleep" not in spec:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.get_stats()
        print(json.dumps({
            "preemptions": stats.num_preemptions_total, "compiles": stats.num_compiles,
            "recompiles": stats.num_recompiles_after_warmup, "warmup_seconds": stats.warmup_seconds,
            "ids": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[{str(t): lp.logprob for t, lp in step.items() if lp.rank <= 5}
                          for step in o.outputs[0].logprobs] for o in outs]}), flush=True)
        return 0
    engine = llm.engine
    for i, p in enumerate(spec["prompts"]):
        engine.add_request(str(i), None, params, prompt_token_ids=p)
    steps, done = 0, set()
    try:
        while engine.has_unfinished_requests():
            done |= {o.request_id for o in engine.step() if o.finished}
            steps += 1
            if steps == 3:
                print("STEPPING", flush=True)
            time.sleep(spec["step_sleep"])
    except Exception as exc:  # noqa: BLE001 - what the test checks
        failed = sorted(set(map(str, range(len(prompts)))) - done)
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "failed": failed, "steps": steps}), flush=True)
        return 1
    print(json.dumps({"error": None, "steps": steps}), flush=True)
    return 0


if __name__ == "__main__":
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` shows where a hung rank is
    if os.environ.get("JAXLLM_HANG_DUMP"):  # debugging: where each rank is after that many seconds
        import faulthandler
        import logging
        logging.basicConfig(level=logging.INFO)
        faulthandler.dump_traceback_later(float(os.environ["JAXLLM_HANG_DUMP"]), exit=True)
    sys.exit(main(json.loads(sys.argv[1])))
