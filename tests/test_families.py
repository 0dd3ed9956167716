"""Model families of issue 9 against HF transformers goldens (scripts/make_golden.py), through LLM.generate.

Each tiny checkpoint has every parameter randomized (biases, norms and routers too) and a 16-token
sliding window where the family has one; prompts of 1, 7 and 23 tokens with 32 greedy tokens each run
both inside and past the window. The three prompts go in one batch with a 32-token step budget, so
the 23-token prompt is prefilled in chunks next to the others' decode rows.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from jaxllm import LLM, SamplingParams
from models.layers import grouped_matmul, moe_forward, route

DATA = os.path.join(os.path.dirname(__file__), "data")
FAMILIES = ["tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-gemma2", "tiny-phi3", "tiny-phi3-longrope",
            "tiny-mixtral", "tiny-qwen3-moe"]


def golden(name: str) -> dict:
    with open(os.path.join(DATA, "goldens", f"{name}.json")) as f:
        return json.load(f)


def tiny_llm(name: str, **flags) -> LLM:
    # The tiny checkpoints have no tokenizer; SmolLM2's covers their 384 ids (prompts are token ids).
    flags = {"max_num_seqs": 4, "max_num_batched_tokens": 32, "max_model_len": 64, "page_size": 8,
             "warmup": False, **flags}
    return LLM(os.path.join(DATA, name), tokenizer=models.default_model_path(), **flags)


def assert_matches_golden(outs, gold, atol=1e-3):
    for out, case in zip(outs, gold["cases"]):
        got, want = out.outputs[0].token_ids, case["output_ids"]
        assert len(want) >= 24
        assert got == want, f"greedy ids diverge at step {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
        for step, (ours, theirs) in enumerate(zip(out.outputs[0].logprobs, case["top_logprobs"])):
            ours_top = sorted(((lp.logprob, t) for t, lp in ours.items() if lp.rank <= 5), reverse=True)
            for (lp, tid), (tid_hf, lp_hf) in zip(ours_top, theirs[:5]):
                assert tid == tid_hf and abs(lp - lp_hf) < atol, (step, tid, tid_hf, lp, lp_hf)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_hf(name):
    gold = golden(name)
    # LongRoPE's 70-token case is past the original 64-token context from its first chunk on: one chunk
    # (HF rotates the whole sequence with one set of factors; see models.layers.rope_cos_sin).
    llm = tiny_llm(name, max_model_len=128, max_num_batched_tokens=128) if "longrope" in name else tiny_llm(name)
    prompts = [{"prompt_token_ids": c["prompt_ids"]} for c in gold["cases"]]
    n = len(gold["cases"][0]["output_ids"])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    assert_matches_golden(outs, gold)


def test_family_configs_are_what_the_goldens_exercise():
    """The structural features each golden is meant to cover are really on in the loaded config."""
    cfg = {n: models.load_model(os.path.join(DATA, n)).config for n in FAMILIES}
    assert cfg["tiny-qwen2"].attention_bias and not cfg["tiny-qwen2"].tie_word_embeddings
    assert cfg["tiny-qwen3"].qk_norm and cfg["tiny-qwen3"].head_dim * cfg["tiny-qwen3"].num_heads != 64
    g3 = cfg["tiny-gemma3"]
    assert g3.layer_windows() == (16, 16, None, 16) and g3.local_rope_theta == 10000.0
    assert g3.rope_theta == 100000.0 and g3.rope_scaling["rope_type"] == "linear" and g3.norm_offset == 1.0
    g2 = cfg["tiny-gemma2"]
    assert g2.layer_windows() == (16, None, 16) and g2.attn_logit_softcap == 2.0 and g2.final_logit_softcap == 3.0
    assert cfg["tiny-mixtral"].layer_is_moe() == (True, True) and cfg["tiny-mixtral"].sliding_window == 16
    assert cfg["tiny-qwen3-moe"].layer_is_moe() == (True, False, True, True)
    lr = cfg["tiny-phi3-longrope"].rope_scaling
    assert lr["rope_type"] == "longrope" and lr["original_max_position_embeddings"] == 64
    assert not cfg["tiny-qwen3-moe"].norm_topk_prob


def test_moe_batch_invariance_under_preemption():
    """MoE routing is per token: a request's greedy output is the same alone, batched, and recomputed
    after preemption (tight pool, small step budget)."""
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": [int(t) for t in rng.integers(3, 384, int(n))]} for n in rng.integers(1, 30, 10)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone_llm = tiny_llm("tiny-qwen3-moe")
    alone = [alone_llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:4]]
    busy = tiny_llm("tiny-qwen3-moe", max_num_seqs=8, max_num_batched_tokens=16, max_model_len=48, num_pages=10)
    together = [o.outputs[0].token_ids for o in busy.generate(prompts, params, use_tqdm=False)]
    assert busy.engine.get_stats().num_preemptions_total > 0
    assert together[:4] == alone


# ------------------------------------------------------------------ MoE grouped matmul vs a dense reference

def _dense_moe_reference(x, router, gate, up, down, top_k, norm):
    """Per token, per chosen expert, in NumPy float64."""
    x, router, gate, up, down = (np.asarray(a, np.float64) for a in (x, router, gate, up, down))
    logits = x @ router
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = np.argsort(-p[t], kind="stable")[:top_k]
        w = p[t, chosen] / (p[t, chosen].sum() if norm else 1.0)
        for e, we in zip(chosen, w):
            h = x[t] @ gate[e]
            out[t] += we * ((h / (1 + np.exp(-h))) * (x[t] @ up[e])) @ down[e]
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_moe_grouped_matmul_matches_dense_reference(norm):
    rng = np.random.default_rng(0)
    t, h, i, e, k = 13, 16, 8, 6, 2
    x = np.abs(rng.normal(size=(t, h))).astype(np.float32)  # positive, so the columns below lose
    router = rng.normal(size=(h, e)).astype(np.float32)
    router[:, 1] = -5.0  # expert 1 never wins: an empty group in the middle
    router[:, 5] = -5.0  # nor does the last one
    gate, up = (rng.normal(size=(e, h, i)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(e, i, h)).astype(np.float32)
    weights, experts = route(jnp.asarray(x), jnp.asarray(router), k, norm)
    assert not np.isin([1, 5], np.asarray(experts)).any()
    got = jax.jit(moe_forward)(jnp.asarray(x), weights, experts, gate, up, down)
    want = _dense_moe_reference(x, router, gate, up, down, k, norm)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_grouped_matmul_with_empty_groups():
    rng = np.random.default_rng(1)
    sizes = np.array([3, 0, 5, 0], np.int32)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    w = rng.normal(size=(4, 4, 3)).astype(np.float32)
    got = np.asarray(grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes)))
    owner = np.repeat(np.arange(4), sizes)
    np.testing.assert_allclose(got, np.einsum("mk,mkn->mn", x, w[owner]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ per-layer sliding windows

def test_reference_attention_takes_a_traced_window():
    """The layer scan hands the reference each layer's window as a traced int (NO_WINDOW = none)."""
    from models.layers import NO_WINDOW
    from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention as ref
    rng = np.random.default_rng(0)
    page, pages, hkv, d = 8, 12, 2, 16
    kv = jnp.asarray(rng.normal(size=(pages, page, 2 * hkv, d)).astype(np.float32))
    q = jnp.asarray(rng.normal(size=(40, 4, d)).astype(np.float32))
    args = (q, kv, jnp.array([37, 50]), jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % pages,
            jnp.array([0, 39, 40]), jnp.array([2]))
    traced = jax.jit(lambda w: ref(*args, sm_scale=0.25, sliding_window=w))
    for static in (None, 5, 16):
        want = ref(*args, sm_scale=0.25, sliding_window=static)
        got = traced(jnp.int32(NO_WINDOW if static is None else static))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_mixed_windows_through_a_pallas_kernel(name):
    """With a Pallas kernel (static windows) the scan switches between kernel instances per layer;
    it must give what the reference's traced windows give."""
    import dataclasses
    from models.layers import attention_windows
    from tests.test_models import PagedRunner
    loaded = models.load_model(os.path.join(DATA, name))
    assert attention_windows(loaded.config)[0] == "traced"
    kern_cfg = dataclasses.replace(loaded.config, attention_backend="tpu", attention_interpret=True)
    assert attention_windows(kern_cfg)[0] == "switch"
    kern = models.DecoderLM(kern_cfg, weights={k: np.asarray(v) for k, v in loaded.model.canonical_weights().items()})
    prompt = golden(name)["cases"][2]["prompt_ids"]  # 23 tokens: past the 16-token window
    np.testing.assert_allclose(PagedRunner(kern).step([(0, prompt, 0)])[0],
                               PagedRunner(loaded.model).step([(0, prompt, 0)])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-qwen3-moe"])
def test_bfloat16_tracks_float32(name):
    """bfloat16 weights and activations ((1 + w) norms, soft-caps, bf16 ragged_dot) stay near float32."""
    from tests.test_models import PagedRunner, log_softmax
    prompt = golden(name)["cases"][1]["prompt_ids"]
    f32 = PagedRunner(models.load_model(os.path.join(DATA, name)).model).step([(0, prompt, 0)])[0]
    bf = models.load_model(os.path.join(DATA, name), dtype="bfloat16")
    assert bf.model.embed_tokens[...].dtype == jnp.bfloat16
    b16 = PagedRunner(bf.model).step([(0, prompt, 0)])[0]
    assert b16.dtype == np.float32 and np.abs(log_softmax(f32) - log_softmax(b16)).max() < 0.5
