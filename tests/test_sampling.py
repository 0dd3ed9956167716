"""SamplingParams validation/normalization and the device sampler against a NumPy (float64) reference."""

from __future__ import annotations

import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.engine.sampler import (PenaltyRows, RowSpec, SamplingTensors, apply_bias_and_penalties, bucket,
                                   processed_logits, sample)
from jaxllm.sampling_params import SamplingParams

# ------------------------------------------------------------------------------------------------
# SamplingParams
# ------------------------------------------------------------------------------------------------


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.is_greedy and not p.needs_penalties and p.num_samples == 1


@pytest.mark.parametrize("kwargs,name", [
    (dict(n=0), "n"),
    (dict(n=2, best_of=1), "best_of"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=30), "prompt_logprobs"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop_token_ids=[-5]), "stop_token_ids"),
    (dict(seed=1.5), "seed"),
    (dict(seed="7"), "seed"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
])
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).split(" ")[0] == name, str(e.value)


def test_temperature_message():
    with pytest.raises(ValueError, match=r"^temperature must be non-negative, got -1$"):
        SamplingParams(temperature=-1)


def test_normalization_and_helpers():
    p = SamplingParams(stop="###", top_k=-1, logit_bias={"5": 250.0, 7: -1e9, 9: 0.5}, max_tokens=None,
                       min_tokens=3, stop_token_ids=(4, 8), repetition_penalty=1.1)
    assert p.stop == ["###"] and p.top_k == 0 and p.stop_token_ids == [4, 8]
    assert p.logit_bias == {5: 100.0, 7: -100.0, 9: 0.5}
    assert p.needs_penalties and p.max_tokens is None
    assert p.all_stop_token_ids(2) == {2, 4, 8}
    assert p.all_stop_token_ids([2, 3]) == {2, 3, 4, 8}
    assert SamplingParams(ignore_eos=True, stop_token_ids=[4]).all_stop_token_ids(2) == {4}
    assert SamplingParams(presence_penalty=0.1).needs_penalties
    assert SamplingParams(frequency_penalty=-0.1).needs_penalties
    # Greedy: truncation switched off because it cannot change an argmax.
    g = SamplingParams.greedy(top_k=5, top_p=0.5, min_p=0.2, max_tokens=4)
    assert g.is_greedy and (g.top_k, g.top_p, g.min_p, g.max_tokens) == (0, 1.0, 0.0, 4)
    assert SamplingParams(temperature=1e-6).is_greedy and not SamplingParams(temperature=1e-4).is_greedy
    assert SamplingParams(n=2, best_of=3).num_samples == 3
    with pytest.raises(ValueError, match="^top_p"):
        p.clone(top_p=0)
    assert p.clone(temperature=0.5).temperature == 0.5 and p.temperature == 1.0


# ------------------------------------------------------------------------------------------------
# NumPy reference (float64, written token by token, independent of the JAX code)
# ------------------------------------------------------------------------------------------------


def ref_penalized(logits, temperature=1.0, repetition_penalty=1.0, presence_penalty=0.0,
                  frequency_penalty=0.0, prompt=(), output=(), bias=None, **_):
    l = np.asarray(logits, np.float64).copy()
    for tok, b in (bias or {}).items():
        l[tok] += b
    counts = Counter(int(x) for x in output)
    for tok in set(int(x) for x in prompt) | set(counts):
        l[tok] = l[tok] / repetition_penalty if l[tok] > 0 else l[tok] * repetition_penalty
    for tok, c in counts.items():
        l[tok] -= c * frequency_penalty + presence_penalty
    return l


def ref_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, **pen):
    """The exact distribution the sampler should draw from (one-hot for greedy)."""
    l = ref_penalized(logits, **pen)
    V = len(l)
    if temperature < 1e-5:
        out = np.zeros(V)
        out[int(np.argmax(l))] = 1.0
        return out
    x = l / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = [bool(p[i] >= min_p * p.max()) for i in range(V)]
    order = sorted(range(V), key=lambda i: -x[i])
    if top_k > 0:
        allowed = [i for i in order if keep[i]][:top_k]
        keep = [i in allowed for i in range(V)]
    if top_p < 1.0:
        mass = sum(p[i] for i in range(V) if keep[i])
        cum, nucleus = 0.0, []
        for i in order:
            if not keep[i]:
                continue
            nucleus.append(i)
            cum += p[i] / mass
            if cum >= top_p:
                break
        keep = [i in nucleus for i in range(V)]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def row_from(cfg, seed=0, step=0, target=-1):
    return RowSpec(temperature=cfg.get("temperature", 1.0), top_k=cfg.get("top_k", 0),
                   top_p=cfg.get("top_p", 1.0), min_p=cfg.get("min_p", 0.0),
                   repetition_penalty=cfg.get("repetition_penalty", 1.0),
                   presence_penalty=cfg.get("presence_penalty", 0.0),
                   frequency_penalty=cfg.get("frequency_penalty", 0.0), seed=seed, step=step,
                   bias=cfg.get("bias"), target_id=target)


def pen_from(cfgs, V, R=None):
    """Dense penalty rows for the configs (what the engine's per-seat device state holds)."""
    return PenaltyRows.from_ids([c.get("prompt", ()) for c in cfgs], [c.get("output", ()) for c in cfgs], V, R)


def chi2_quantile(df: int, z: float = 3.9) -> float:
    """Wilson-Hilferty approximation of the chi-square upper quantile (z=3.9 ~ p=5e-5)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ------------------------------------------------------------------------------------------------
# Host-side helpers
# ------------------------------------------------------------------------------------------------


def test_bucket():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 17, 64)] == [1, 1, 2, 4, 4, 8, 32, 64]
    assert bucket(3, minimum=8) == 8


def test_penalty_rows_match_counter():
    rng = np.random.default_rng(0)
    prompt, output = rng.integers(0, 50, 40), rng.integers(0, 50, 30)
    pen = PenaltyRows.from_ids([prompt], [output], 50)
    c = Counter(output.tolist())
    assert pen.output_counts.shape == (1, 50)
    assert pen.output_counts[0].tolist() == [c[i] for i in range(50)]
    assert pen.in_prompt[0].tolist() == [i in set(prompt.tolist()) for i in range(50)]


def test_build_pads_and_from_params():
    p = SamplingParams(temperature=0.7, top_k=3, presence_penalty=0.5, logit_bias={4: 2.0}, seed=-1)
    r = RowSpec.from_params(p, seed=2**32 + 5, step=3, suppress_ids=[0])
    t = SamplingTensors.build([r, RowSpec.from_params(SamplingParams(logprobs=2), seed=1, step=0)], R=4)
    assert t.bias_ids.shape == (4, 2)
    assert t.presence_penalty[0] == 0.5 and t.top_logprobs.tolist() == [False, True, False, False]
    assert dict(zip(t.bias_ids[0].tolist(), t.bias_values[0].tolist())) == {4: 2.0, 0: -np.inf}
    assert t.seeds[0] == 5 and t.steps[0] == 3 and t.top_k[0] == 3
    # Second row has no bias (none requested) and padding rows are inert greedy rows.
    assert (t.bias_ids[1:] == -1).all()
    np.testing.assert_array_equal(t.temperature[2:], 0.0)
    np.testing.assert_array_equal(t.top_p[2:], 1.0)
    np.testing.assert_array_equal(t.target_ids, -1)
    with pytest.raises(ValueError, match="buckets too small"):
        SamplingTensors.build([r], R=1, B=1)
    # A batch without biases pays for one slot only.
    t0 = SamplingTensors.build([RowSpec(temperature=1.0)] * 3)
    assert t0.bias_ids.shape == (4, 1)


# ------------------------------------------------------------------------------------------------
# Device processing vs reference
# ------------------------------------------------------------------------------------------------


def test_bias_and_penalties_match_reference():
    rng = np.random.default_rng(1)
    V, R = 32, 6
    logits = rng.normal(0, 3, (R, V)).astype(np.float32)
    cfgs = []
    for i in range(R):
        cfgs.append(dict(
            repetition_penalty=float(rng.uniform(0.5, 2.0)),
            presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2)),
            prompt=rng.integers(0, V, rng.integers(0, 12)), output=rng.integers(0, V, rng.integers(0, 12)),
            bias={int(k): float(rng.uniform(-5, 5)) for k in rng.choice(V, 3, replace=False)}))
    cfgs[0]["bias"][int(cfgs[0]["output"][0]) if len(cfgs[0]["output"]) else 0] = -np.inf
    cfgs[1] = dict(repetition_penalty=1.3, prompt=[1, 2, 3])  # prompt only: no presence/frequency
    t = SamplingTensors.build([row_from(c) for c in cfgs], R=8, B=4)
    got = np.asarray(apply_bias_and_penalties(jnp.asarray(np.pad(logits, ((0, 2), (0, 0)))), t,
                                              pen_from(cfgs, V, R=8)))
    for i, c in enumerate(cfgs):
        np.testing.assert_allclose(got[i], ref_penalized(logits[i], **c), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[R:], 0.0)  # padding rows untouched
    assert not np.allclose(got[:R], logits)  # the processing did something


@pytest.mark.parametrize("trial", range(3))
def test_truncation_support_matches_reference(trial):
    rng = np.random.default_rng(10 + trial)
    V, R = 48, 16
    logits = rng.normal(0, 2, (R, V)).astype(np.float32)
    cfgs = []
    for _ in range(R):
        cfgs.append(dict(temperature=float(rng.choice([0.3, 0.7, 1.0, 1.8])),
                         top_k=int(rng.choice([0, 1, 3, 10, 60])),
                         top_p=float(rng.choice([1.0, 0.9, 0.5, 0.2])),
                         min_p=float(rng.choice([0.0, 0.05, 0.3])),
                         repetition_penalty=float(rng.choice([1.0, 1.5])),
                         prompt=rng.integers(0, V, 5), output=rng.integers(0, V, 5),
                         bias={int(rng.integers(V)): 4.0}))
    t = SamplingTensors.build([row_from(c) for c in cfgs], R=R)
    _, x = jax.jit(processed_logits)(jnp.asarray(logits), t, pen_from(cfgs, V))
    x = np.asarray(x)
    sizes = []
    for i, c in enumerate(cfgs):
        want = ref_distribution(logits[i], **c)
        assert set(np.flatnonzero(np.isfinite(x[i]))) == set(np.flatnonzero(want > 0)), (i, c)
        # Within the support, softmax(x) must be the reference distribution.
        fin = np.isfinite(x[i])
        q = np.exp(x[i][fin] - x[i][fin].max())
        np.testing.assert_allclose(q / q.sum(), want[fin], rtol=1e-4, atol=1e-6)
        sizes.append(int(fin.sum()))
    assert min(sizes) < max(sizes)  # the configurations really truncate differently


def test_truncation_keeps_ties_at_the_cutoff_and_top_token():
    logits = np.array([[3.0, 1.0, 3.0, 3.0, -2.0, 0.0, -np.inf, 1.0],
                       [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    rows = [RowSpec(temperature=1.0, top_k=2), RowSpec(temperature=1.0, top_p=0.01),
            RowSpec(temperature=1.0, top_k=8, top_p=0.3)]
    _, x = processed_logits(jnp.asarray(logits), SamplingTensors.build(rows, R=3))
    fin = np.isfinite(np.asarray(x))
    np.testing.assert_array_equal(np.flatnonzero(fin[0]), [0, 2, 3])  # 3-way tie at the k-th value
    np.testing.assert_array_equal(np.flatnonzero(fin[1]), [0])  # tiny top_p still keeps the top token
    assert fin[2].all()  # a uniform row: every token ties the cut-off


DIST_CASES = {
    "plain": dict(temperature=1.0),
    "hot": dict(temperature=2.5),
    "cold": dict(temperature=0.4),
    "top_k": dict(temperature=1.0, top_k=5),
    "top_p": dict(temperature=1.2, top_p=0.7),
    "min_p": dict(temperature=0.9, min_p=0.1),
    "all+penalties": dict(temperature=1.1, top_k=9, top_p=0.9, min_p=0.02, repetition_penalty=1.4,
                          presence_penalty=0.7, frequency_penalty=0.3, prompt=[0, 1, 2, 3],
                          output=[1, 1, 4, 7], bias={5: 1.5, 6: -np.inf}),
}


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_empirical_frequencies_match_reference(case):
    cfg = DIST_CASES[case]
    V, N = 16, 4096
    logits = np.random.default_rng(3).normal(0, 1.5, V).astype(np.float32)
    want = ref_distribution(logits, **cfg)
    # N rows with identical inputs and steps 0..N-1: N independent draws in one call.
    t = SamplingTensors.build([row_from(cfg, seed=1234, step=s) for s in range(N)], R=N)
    toks = np.asarray(sample(jnp.asarray(np.tile(logits, (N, 1))), t, pen_from([cfg] * N, V)).token_ids)
    obs = np.bincount(toks, minlength=V)
    assert obs[want == 0].sum() == 0, "sampled a token outside the reference support"
    exp = want * N
    big = exp >= 5  # pool rare tokens so the chi-square approximation holds
    o = np.append(obs[big], obs[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    o, e = o[e > 0], e[e > 0]
    chi2 = float(((o - e) ** 2 / e).sum())
    df = max(len(e) - 1, 1)
    assert chi2 < chi2_quantile(df), (case, chi2, df, obs, exp.round(1))


def test_greedy_is_argmax_of_penalized_logits_and_mixes_with_random_rows():
    rng = np.random.default_rng(4)
    V, R = 64, 8
    logits = rng.normal(0, 1, (R, V)).astype(np.float32)
    cfgs = [dict(temperature=0.0), dict(temperature=0.0, top_k=1),
            dict(temperature=0.0, repetition_penalty=3.0, prompt=[int(np.argmax(logits[2]))]),
            dict(temperature=0.0, bias={7: 50.0}), dict(temperature=1.0), dict(temperature=0.0)]
    t = SamplingTensors.build([row_from(c, seed=i) for i, c in enumerate(cfgs)], R=R)
    out = sample(jnp.asarray(logits), t, pen_from(cfgs, V, R))
    toks = np.asarray(out.token_ids)
    for i, c in enumerate(cfgs):
        if c["temperature"] == 0.0:
            assert toks[i] == int(np.argmax(ref_penalized(logits[i], **c))), i
    assert toks[2] != int(np.argmax(logits[2])) and toks[3] == 7  # the processing mattered
    # Padding rows (temperature 0) are greedy too, and an all-greedy batch takes the no-noise path.
    np.testing.assert_array_equal(toks[6:], np.argmax(logits[6:], axis=1))
    all_greedy = [c if c["temperature"] == 0.0 else dict(temperature=0.0) for c in cfgs]
    toks2 = np.asarray(sample(jnp.asarray(logits), SamplingTensors.build(
        [row_from(c) for c in all_greedy], R=R), pen_from(all_greedy, V, R)).token_ids)
    np.testing.assert_array_equal(np.delete(toks2, 4), np.delete(toks, 4))
    assert toks2[4] == int(np.argmax(logits[4]))


def test_logprobs_are_raw_log_softmax_with_ranks_and_targets():
    rng = np.random.default_rng(5)
    V, R, k = 40, 4, 6
    logits = rng.normal(0, 2, (R, V)).astype(np.float32)
    cfgs = [dict(temperature=0.7, bias={3: 20.0}), dict(temperature=0.0, repetition_penalty=5.0,
                                                        prompt=list(range(V))),
            dict(temperature=1.0), dict(temperature=0.0)]
    rows = [row_from(c, seed=9) for c in cfgs]
    rows[2].target_id = 11  # a prompt-logprob row
    # Top logprobs are computed when any row asks (then for every row), skipped when none does.
    skipped = sample(jnp.asarray(logits), SamplingTensors.build(rows, R=R), pen_from(cfgs, V), num_top_logprobs=k)
    assert (np.asarray(skipped.top_ids) == 0).all() and (np.asarray(skipped.top_logprobs) == 0).all()
    rows[1].top_logprobs = True
    out = sample(jnp.asarray(logits), SamplingTensors.build(rows, R=R), pen_from(cfgs, V), num_top_logprobs=k)
    np.testing.assert_array_equal(out.token_ids, skipped.token_ids)
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    toks = np.asarray(out.token_ids)
    assert toks[0] == 3  # the bias made token 3 near-certain, yet its logprob stays the raw one
    for i in range(R):
        tok = 11 if i == 2 else toks[i]
        np.testing.assert_allclose(out.token_logprob[i], ref[i, tok], rtol=1e-5, atol=1e-5)
        assert int(out.token_rank[i]) == 1 + int((ref[i] > ref[i, tok]).sum())
        order = np.argsort(-ref[i])[:k]
        np.testing.assert_array_equal(out.top_ids[i], order)
        np.testing.assert_allclose(out.top_logprobs[i], ref[i, order], rtol=1e-5, atol=1e-5)
    assert out.top_ids.dtype == jnp.int32 and out.top_logprobs.shape == (R, k)
    assert sample(jnp.asarray(logits), SamplingTensors.build(rows, R=R)).top_ids.shape == (R, 0)


def test_seeded_draws_ignore_batch_position_and_neighbours():
    rng = np.random.default_rng(6)
    V = 64
    logits = rng.normal(0, 0.3, V).astype(np.float32)  # high entropy: a coincidence is unlikely
    me = dict(temperature=1.0, top_p=0.95, min_p=0.01)

    def draw(n_other, pos, R, step, other_cfg, seed=777):
        rows = [row_from(other_cfg, seed=100 + j, step=j) for j in range(n_other)]
        rows.insert(pos, row_from(me, seed=seed, step=step))
        L = rng.normal(0, 1, (R, V)).astype(np.float32)
        L[pos] = logits
        cfgs = [other_cfg] * n_other
        cfgs.insert(pos, me)
        out = sample(jnp.asarray(L), SamplingTensors.build(rows, R=R), pen_from(cfgs, V, R))
        return int(out.token_ids[pos])

    for step in range(4):
        a = draw(0, 0, 1, step, {})
        b = draw(5, 3, 8, step, dict(temperature=0.5, top_k=4, repetition_penalty=1.5,
                                     prompt=[1, 2], bias={0: 3.0}))
        c = draw(2, 2, 4, step, dict(temperature=0.0))  # neighbours need no sort and no noise
        assert a == b == c, (step, a, b, c)
    steps = [draw(1, 1, 2, s, {}) for s in range(24)]
    assert len(set(steps)) >= 8, steps  # different steps give different draws
    seeds = [draw(1, 0, 2, 0, {}, seed=s) for s in range(24)]
    assert len(set(seeds)) >= 8, seeds


def test_suppressed_tokens_never_sampled_and_bf16_inside_jit():
    V, R = 16, 256
    logits = np.zeros((R, V), np.float32)
    logits[:, 2] = 5.0  # token 2 dominates but is suppressed (e.g. EOS before min_tokens)
    p = SamplingParams(temperature=1.0, min_tokens=4, logprobs=2)
    rows = [RowSpec.from_params(p, seed=0, step=s, suppress_ids=p.all_stop_token_ids(2)) for s in range(R)]
    t = SamplingTensors.build(rows)

    @jax.jit
    def step(lg, t):  # how the engine calls it: inside its own jitted step
        return sample(lg.astype(jnp.bfloat16), t, num_top_logprobs=2)

    out = step(jnp.asarray(logits), t)
    toks = np.asarray(out.token_ids)
    assert (toks != 2).all() and len(set(toks.tolist())) == V - 1
    assert (np.asarray(out.top_ids)[:, 0] == 2).all()  # raw logprobs still see token 2 on top


def test_vocabulary_reductions_on_cpu_match_their_reference():
    """The sampler's argmax and log-sum-exp / rank: one custom call each on CPU (pallas_kernels.sampling)
    with the jnp reference's results: the first of tied maxima, -inf entries, a vocabulary off the 16
    lanes; the log-sum-exp to float32 rounding."""
    from pallas_kernels import sampling as kernels
    from pallas_kernels.quantized_matmul import ggml_cpu
    if not ggml_cpu.available():
        pytest.skip("the ggml extension is not built: the jnp reference runs")
    rng = np.random.default_rng(3)
    for V in (49152, 1000, 7):
        x = (rng.standard_normal((6, V)) * 4).astype(np.float32)
        x[1, [5 % V, 6 % V]] = x[1].max() + 1  # a tie: the first index wins
        x[2, : V // 2] = -np.inf
        x[3] = -np.inf
        wanted = np.array([0, 5 % V, V - 1, 2 % V, V // 2, 1], np.int32)
        fused = jax.jit(lambda x, w: (kernels.argmax_rows(x), *kernels.logprob_stats(x, w)))
        assert "jaxllm_cpu_row_argmax" in fused.lower(x, wanted).as_text()
        ids, lse, rank = fused(x, wanted)
        np.testing.assert_array_equal(np.asarray(ids), np.argmax(x, axis=-1))
        want_lse, want_rank = kernels.logprob_stats_reference(jnp.asarray(x), jnp.asarray(wanted))
        np.testing.assert_array_equal(np.asarray(rank), np.asarray(want_rank))
        live = [0, 1, 2, 4, 5]  # row 3 has no finite logit: -inf here (the reference's max-shift gives NaN)
        np.testing.assert_allclose(np.asarray(lse)[live], np.asarray(want_lse)[live], rtol=2e-6)
        assert np.asarray(lse)[3] == -np.inf
