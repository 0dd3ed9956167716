"""Tensor / expert parallel on 8 simulated CPU devices (issue 10): the same greedy ids as one device,
top-5 logprobs within 1e-4 (float32), each device holding 1/N of the sharded parameters and pool.

Each case runs in a subprocess (tests/parallel_worker.py) with
XLA_FLAGS=--xla_force_host_platform_device_count=8; this process keeps its single device. Prompts of
1, 7 and 23 tokens with a 16-token step budget put chunked prefill next to decode rows, and a pool of
a few pages makes the scheduler preempt and recompute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import models

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
PROMPTS = [[5], list(range(10, 17)), list(range(40, 63))]
TINY_FLAGS = {"max_num_seqs": 4, "max_num_batched_tokens": 16, "max_model_len": 64, "page_size": 4, "num_pages": 12,
              "warmup": False, "param_cache": False, "persistent_cache": False}


def run_worker(spec: dict, timeout: float = 600) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "parallel_worker.py"), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_outputs(base: dict, other: dict, atol: float = 1e-4) -> None:
    assert other["ids"] == base["ids"]
    for prompt_a, prompt_b in zip(base["logprobs"], other["logprobs"]):
        for step, (a, b) in enumerate(zip(prompt_a, prompt_b)):
            assert a.keys() == b.keys(), step
            for t in a:
                assert abs(a[t] - b[t]) < atol, (step, t, a[t], b[t])


def assert_sharded_bytes(r: dict, n: int) -> None:
    """Every one of the n devices holds exactly the sharded parts / n plus the replicated parts."""
    assert len(r["param_bytes"]) == n and len(r["pool_bytes"]) == n
    assert set(r["param_bytes"].values()) == {r["expected_param_bytes"]}
    assert set(r["pool_bytes"].values()) == {r["expected_pool_bytes"]}


def tiny_spec(name: str, runs: list[dict], **extra) -> dict:
    return {"model": os.path.join(DATA, name), "flags": TINY_FLAGS, "prompts": PROMPTS, "max_tokens": 24,
            "runs": [{"tensor_parallel_size": 1}] + runs, **extra}


@pytest.mark.parametrize("name,sizes", [("tiny-llama", (2, 4)), ("tiny-qwen3", (2,))])
def test_dense_tp_matches_one_device(name, sizes):
    # Qwen3 (q/k norms) at TP 2 only: TP 4's replicated KV heads are the same code for both families.
    base, *sharded = run_worker(tiny_spec(name, [{"tensor_parallel_size": n} for n in sizes], hlo_tokens=16))
    assert base["preemptions"] > 0  # the small pool forces recompute
    for r, n in zip(sharded, sizes):
        assert_same_outputs(base, r)
        assert_sharded_bytes(r, n)
        # Megatron: one all-reduce after o_proj and one after down_proj (inside the layer scan's body,
        # so counted once) plus the vocab-parallel embedding's; no all-gather of activations.
        assert r["collectives"] == {"all-reduce": 3}, r["collectives"]
        # 2 KV heads: split at TP 2 (half the pool per device), replicated at TP 4.
        assert r["expected_pool_bytes"] * (n if n <= 2 else 1) == r["total_pool_bytes"]
    # The parameters are mostly sharded: norms and (Qwen3) q/k norms are the only replicated ones...
    assert sharded[0]["expected_param_bytes"] < 0.55 * sharded[0]["total_param_bytes"]


def test_other_families_tp2_match_one_device():
    # Sharded biases (Qwen2); sliding / full layers, soft-caps, sandwich norms (Gemma 2). Gemma 3, Phi-3
    # and Mistral also match at TP 2 (checked by hand; left out to keep the suite short).
    names = ["tiny-qwen2", "tiny-gemma2"]
    specs = [dict(tiny_spec(name, [{"tensor_parallel_size": 2}]), max_tokens=10) for name in names]
    for name, (base, tp2) in zip(names, run_worker({"specs": specs})):
        assert_same_outputs(base, tp2), name
        assert_sharded_bytes(tp2, 2)


def test_moe_tp2_and_expert_parallel_match_one_device():
    # One sharded layout per family, in one process: the MoE layer and its sharding are shared code,
    # and test_load_time_shardings_agree_with_the_modules checks every family's specs at TP and EP.
    specs = [tiny_spec("tiny-mixtral", [{"tensor_parallel_size": 2}]),
             tiny_spec("tiny-qwen3-moe", [{"tensor_parallel_size": 4, "enable_expert_parallel": True}])]
    (base, tp2), (base_ep, ep4) = run_worker({"specs": specs})
    assert_same_outputs(base, tp2)
    assert_sharded_bytes(tp2, 2)
    assert_same_outputs(base_ep, ep4)
    assert_sharded_bytes(ep4, 4)


def test_quantized_weights_and_kv_tp2_match_one_device():
    """fp8 weights (split over their output rows) and an int8 KV pool (values and per-token scales split
    over KV heads) give one device's outputs."""
    flags = {**TINY_FLAGS, "quantization": "fp8", "kv_cache_dtype": "int8"}
    base, tp2 = run_worker({**tiny_spec("tiny-llama", [{"tensor_parallel_size": 2}]), "flags": flags,
                            "max_tokens": 12})
    # A K/V value one float32 ulp off under another partitioning can round to the next int8 step: ids
    # agree, logprobs within that step's effect rather than 1e-4.
    assert_same_outputs(base, tp2, atol=5e-3)
    assert_sharded_bytes(tp2, 2)
    assert tp2["expected_pool_bytes"] * 2 == tp2["total_pool_bytes"]


def test_smollm2_tp3():
    # SmolLM2-135M: 9 query heads, 3 KV heads: one KV head per device, three query heads each.
    spec = {"model": None, "prompts": PROMPTS, "max_tokens": 12,
            "flags": {"max_num_seqs": 4, "max_num_batched_tokens": 16, "max_model_len": 56, "num_pages": 7,
                      "page_size": 8, "warmup": False, "persistent_cache": False},
            "runs": [{"tensor_parallel_size": 1}, {"tensor_parallel_size": 3}]}
    base, tp3 = run_worker(spec)
    assert base["preemptions"] > 0
    assert_same_outputs(base, tp3)
    assert_sharded_bytes(tp3, 3)
    assert tp3["expected_pool_bytes"] * 3 == tp3["total_pool_bytes"]


def test_tp_must_divide_query_heads():
    code = ("from jaxllm.engine.engine import LLMEngine; import models; "
            f"LLMEngine(model={os.path.join(DATA, 'tiny-llama')!r}, tokenizer=models.default_model_path(), "
            "tensor_parallel_size=3, warmup=False, param_cache=False)")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ValueError: tensor_parallel_size 3 does not divide the model's 4 query heads" in proc.stderr


def test_dp2_x_tp2_matches_one_device():
    spec = tiny_spec("tiny-llama", [{"tensor_parallel_size": 2, "data_parallel_size": 2}])
    spec["prompts"] = PROMPTS + [[7, 8, 9]]
    base, dp = run_worker(spec)
    assert_same_outputs(base, dp)
    assert_sharded_bytes(dp, 2)  # replica 0's two devices
    assert len(dp["replica_prompt_tokens"]) == 2 and min(dp["replica_prompt_tokens"]) > 0  # both replicas served


def test_server_data_parallel_spreads_requests():
    import concurrent.futures

    import httpx

    from tests.server_support import ServerProcess, metric_value
    srv = ServerProcess(["--data-parallel-size", "2", "--max-num-seqs", "4", "--max-model-len", "128",
                         "--max-num-batched-tokens", "32", "--served-model-name", "smol"],
                        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    try:
        srv.wait_ready(600)
        body = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: httpx.post(srv.base_url + "/v1/completions", json=body, timeout=300),
                               range(8)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        assert len({r.json()["choices"][0]["text"] for r in rs}) == 1  # the same greedy text on both replicas
        text = httpx.get(srv.base_url + "/metrics").text
        per_engine = [metric_value(text, "vllm:prompt_tokens_total", engine=e) for e in ("0", "1")]
        assert min(per_engine) > 0
        assert sum(per_engine) == sum(r.json()["usage"]["prompt_tokens"] for r in rs)
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-qwen3-moe", "tiny-gemma2"])
def test_load_time_shardings_agree_with_the_modules(name):
    """The loaders place each canonical weight by models.sharding.CANONICAL_AXES; the engine then
    applies the modules' own logical axes (shard_model). The two must agree, or loading would move
    every weight twice."""
    import dataclasses

    from flax import nnx

    from models import sharding
    from models.transformer import _CANONICAL, DecoderLM
    config = models.load_model(os.path.join(DATA, name)).config
    for n, ep in ((2, False), (4, False), (4, True)):
        c = dataclasses.replace(config, expert_parallel=ep)
        model = DecoderLM(c, rngs=nnx.Rngs(0))
        by_module = {}
        for path, spec in sharding.param_partition_specs(model, n, ep).items():
            if path[0] == "groups":
                by_module.setdefault(_CANONICAL[".".join(map(str, path[2:]))], set()).add(spec)
            else:
                by_module[{"norm": "norm"}.get(path[0], path[0])] = {spec}
        want = sharding.canonical_specs(c, n)
        assert by_module == {k: {v} for k, v in want.items()}, (name, n, ep)
