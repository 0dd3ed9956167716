"""The orbax cache of converted parameters: a second load restores what the first converted, runtime
options stay the caller's, and a changed source file is converted again."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np

from models import load_model
from tests.test_models import DATA, PagedRunner


def test_param_cache_round_trip(tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(os.path.join(DATA, "tiny-qwen3-moe"), src)
    cache = str(tmp_path / "cache")
    first = load_model(str(src), param_cache=cache)
    assert len(os.listdir(cache)) == 1
    second = load_model(str(src), param_cache=cache, attention_backend="reference")
    assert second.config.attention_backend == "reference"
    assert dataclasses.replace(second.config, attention_backend="auto") == first.config
    w1, w2 = first.model.canonical_weights(), second.model.canonical_weights()
    assert w1.keys() == w2.keys() and all(np.array_equal(w1[k], w2[k]) for k in w1)
    prompt = [3, 17, 99, 120, 5]
    # Same weights; on CPU "auto" runs the attention custom call, so the two differ by float rounding.
    np.testing.assert_allclose(PagedRunner(second.model).step([(0, prompt, 0)]),
                               PagedRunner(first.model).step([(0, prompt, 0)]), rtol=1e-4, atol=1e-5)
    # a changed source (size / mtime) gets its own entry
    with open(src / "config.json", "a") as f:
        f.write("\n")
    load_model(str(src), param_cache=cache)
    assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 2


def test_param_cache_bfloat16(tmp_path):
    cache = str(tmp_path / "cache")
    first = load_model(os.path.join(DATA, "tiny-gemma3"), dtype="bfloat16", param_cache=cache)
    second = load_model(os.path.join(DATA, "tiny-gemma3"), dtype="bfloat16", param_cache=cache)
    w1, w2 = first.model.canonical_weights(), second.model.canonical_weights()
    assert all(w2[k].dtype == w1[k].dtype and np.array_equal(np.asarray(w1[k], np.float32),
                                                             np.asarray(w2[k], np.float32)) for k in w1)
