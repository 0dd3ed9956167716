"""Runs one model at several parallel layouts in a process with simulated devices; prints JSON results.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py '<spec json>'

spec: {"model": path | null (SmolLM2), "flags": engine flags, "prompts": [[ids]], "max_tokens": n,
       "runs": [{"tensor_parallel_size": 2, "enable_expert_parallel": true, ...}], "hlo_tokens": T | null}
For each run: greedy ids and top-5 logprobs per prompt, preemptions, the per-device bytes of the params
and the pool read from the arrays' shards, what 1/N of the sharded parts plus the replicated parts
predicts, and (hlo_tokens) the collectives of the compiled forward program.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from jaxllm import LLM, SamplingParams  # noqa: E402
from models import sharding  # noqa: E402


def expected_bytes(llm) -> tuple[int, int]:
    """(params, pool) bytes each device should hold: sharded parts / N plus replicated parts."""
    runner = llm.engine.runner
    n = runner.mesh.shape[sharding.MODEL]
    model = nnx.merge(runner.graphdef, runner.params)
    specs = sharding.param_partition_specs(model, n, model.config.expert_parallel)
    params = 0
    for path, var in nnx.to_flat_state(runner.params):
        # a quantized weight's spec is a QuantizedArray of specs, one per array (data, scale)
        leaf_specs = jax.tree.leaves(specs[path], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        for leaf, spec in zip(jax.tree.leaves(var.get_value()), leaf_specs):
            params += leaf.nbytes // n if any(a is not None for a in spec) else leaf.nbytes
    pool_split = any(a is not None for a in sharding.pool_spec(model.config, n))
    return params, runner.kv_pages.nbytes // n if pool_split else runner.kv_pages.nbytes


def run(spec: dict, layout: dict) -> dict:
    flags = {**spec.get("flags", {}), **layout}
    llm = LLM(spec.get("model"), tokenizer=models.default_model_path(), **flags)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True,
                                                logprobs=5), use_tqdm=False)
    per_device = llm.engine.runner.bytes_per_device()
    exp_params, exp_pool = expected_bytes(llm)
    result = {
        "ids": [o.outputs[0].token_ids for o in outs],
        "logprobs": [[{str(t): lp.logprob for t, lp in step.items() if lp.rank <= 5} for step in o.outputs[0].logprobs]
                     for o in outs],
        "preemptions": llm.engine.get_stats().num_preemptions_total,
        "replica_prompt_tokens": [r.prompt_tokens_total for r in llm.engine.get_stats().replicas or []],
        "param_bytes": {str(d): b for d, b in per_device["params"].items()},
        "pool_bytes": {str(d): b for d, b in per_device["pool"].items()},
        "expected_param_bytes": exp_params, "expected_pool_bytes": exp_pool,
        "total_param_bytes": sum(a.nbytes for a in jax.tree.leaves(llm.engine.runner.params)),
        "total_pool_bytes": llm.engine.runner.kv_pages.nbytes,
    }
    if spec.get("hlo_tokens"):
        hlo = llm.engine.runner.forward_hlo(spec["hlo_tokens"])
        result["collectives"] = collections.Counter(
            re.findall(r"= \S+ (all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)\(", hlo))
    return result


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    specs = spec["specs"] if "specs" in spec else [spec]  # several models in one process
    results = [[run(s, layout) for layout in s["runs"]] for s in specs]
    print(json.dumps(results if "specs" in spec else results[0]))
