"""jaxllm.batch.ray on a local Ray cluster (ray.init(num_cpus=2)): the tiny model's job gives the same records
as the single-host `python -m jaxllm.run_batch`."""

from __future__ import annotations

import glob
import os

import pytest

import models
from tests.server_support import ROOT
from tests.test_run_batch import TINY, by_id, read_output, run_batch, tiny_args, tiny_input

pytestmark = pytest.mark.timeout(900)


def test_ray_job_equals_single_host(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from jaxllm.batch.ray import run_batch as ray_batch

    inp = tmp_path / "in.jsonl"
    inp.write_text(tiny_input(12))
    r = run_batch(tiny_args(str(inp), str(tmp_path / "single.jsonl")))
    assert r.returncode == 0, r.stderr[-3000:]
    single = by_id(read_output(str(tmp_path / "single.jsonl")))

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        flags = dict(tokenizer=models.default_model_path(), max_num_seqs=4, max_num_batched_tokens=32,
                     max_model_len=128)
        ray_batch(str(inp), str(tmp_path / "ray-out"), model=TINY, engine_flags=flags, num_engines=1,
                  lines_per_call=8)
    finally:
        ray.shutdown()
    records = [rec for path in sorted(glob.glob(str(tmp_path / "ray-out" / "*.jsonl")))
               for rec in read_output(path)]
    got = by_id(records)
    assert len(got) == len(single)
    # Lines without a custom_id are keyed by position in one path and by content in the other.
    assert ({k: v for k, v in got.items() if v["custom_id"]} == {k: v for k, v in single.items() if v["custom_id"]})
