"""Many hosts (issue 10), as two local processes: jax.distributed on 127.0.0.1, 4 simulated CPU devices
each, one mesh of 8 (tensor parallel 8 over tiny-mistral's 8 query heads, its 2 KV heads replicated).

Each process is tests/multihost_worker.py: rank 0 is the engine (LLM), rank 1 follows it. The
two-process run must give the same greedy ids (and top-5 logprobs within 1e-4) as one process on one
device, with warm-up mirrored (every program compiled in the same order on both ranks) and the small
pool preempting. Killing rank 1 mid-generation must make rank 0 fail its requests with an error that
names rank 1 and exit non-zero at once, not hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from jaxllm.config import EngineConfig
from jaxllm.engine import multihost

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "data", "tiny-mistral")
PROMPTS = [list(range(40, 63)), list(range(10, 17)), [5]]
# 8-token steps chunk the 23-token prompt; 10 pages of 4 hold either of the first two prompts and their
# 12 new tokens but not both, so the scheduler preempts and recomputes.
FLAGS = {"max_num_seqs": 2, "max_num_batched_tokens": 8, "max_model_len": 40, "page_size": 4, "num_pages": 10,
         "param_cache": False, "persistent_cache": False}


def free_port_pair() -> int:
    """A port P with P + 1 also free (coordinator, step channel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def start(spec: dict, devices: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(out: str) -> dict:
    # gloo prints its connection notices on stdout; the result is the last JSON line.
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def two_nodes(spec: dict) -> list[dict]:
    port = free_port_pair()
    return [dict(spec, flags={**spec["flags"], "tensor_parallel_size": 8, "nnodes": 2, "node_rank": r,
                              "master_port": port, "node_timeout": 10.0}) for r in (0, 1)]


def test_two_processes_one_mesh_match_one_process():
    spec = {"model": MODEL, "prompts": PROMPTS, "max_tokens": 12, "flags": {**FLAGS, "warmup": True}}
    base = start(dict(spec, flags={**spec["flags"], "warmup": False}), devices=1)
    base_out, base_err = base.communicate(timeout=600)
    assert base.returncode == 0, base_err[-4000:]
    procs = [start(s, devices=4) for s in two_nodes(spec)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]  # rank 1 too: rank 0 told it to exit when done
    a, b = result(base_out), result(outs[0][0])
    assert b["ids"] == a["ids"]
    for prompt_a, prompt_b in zip(a["logprobs"], b["logprobs"]):
        for step, (x, y) in enumerate(zip(prompt_a, prompt_b)):
            assert x.keys() == y.keys(), step
            assert max(abs(x[t] - y[t]) for t in x) < 1e-4, step
    assert a["preemptions"] > 0 and b["preemptions"] > 0
    # Every program was compiled in the mirrored warm-up (rank 1 compiled the same ones in the same
    # order, or the collectives would have deadlocked), and none after.
    assert b["warmup_seconds"] > 0 and b["compiles"] == 11 and b["recompiles"] == 0, b


def test_killed_rank_fails_requests_and_rank0_exits():
    spec = {"model": MODEL, "prompts": [[5], [10, 11]], "max_tokens": 30, "step_sleep": 0.1,
            "flags": {**FLAGS, "warmup": False, "num_pages": 32, "async_scheduling": True}}
    rank0, rank1 = (start(s, devices=4) for s in two_nodes(spec))
    try:
        lines = []
        for line in rank0.stdout:  # generation has started: both ranks are inside the step loop
            lines.append(line)
            if line.startswith("STEPPING"):
                break
        assert lines and lines[-1].startswith("STEPPING"), rank0.stderr.read()[-4000:]
        rank1.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        out, err = rank0.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        rank0.kill()
        rank1.kill()
    assert rank0.returncode == 1, err[-4000:]
    assert elapsed < 15, elapsed  # the channel sees the EOF at once; 10 s is the hard-exit grace
    r = result(out)
    assert r["error"].startswith("LostRankError: node rank 1 of 2"), r
    assert "exited or was killed" in r["error"]
    assert r["failed"] == ["0", "1"]  # both requests were in flight (30 tokens at 0.1 s a step)


def test_channel_frames_round_trip():
    from jaxllm.engine.runner import SampleArrays
    from jaxllm.engine.sampler import RowSpec, SamplingTensors
    import jax
    x = SampleArrays(np.arange(4, dtype=np.int32), np.full(4, 3, np.int32),
                     SamplingTensors.build([RowSpec(temperature=0.5, seed=7)], R=4, B=1, W=2))
    leaves = jax.tree.leaves(x) + [np.asarray(True)]
    a, b = socket.socketpair()
    with a, b:
        a.sendall(multihost._frame("sample", {"k": 1}, leaves))
        kind, meta, got = multihost._read_frame(b)
    assert (kind, meta) == ("sample", {"k": 1})
    for want, have in zip(leaves, got, strict=True):
        assert want.dtype == have.dtype and want.shape == have.shape  # 0-d stays 0-d
        np.testing.assert_array_equal(want, have)


def test_multihost_flags():
    from jaxllm.serve import build_parser
    from jaxllm.config import config_from_args
    args = build_parser().parse_args(["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                                      "--master-port", "1234", "-tp", "16"])
    par = config_from_args(args).parallel
    assert (par.nnodes, par.node_rank, par.master_addr, par.master_port, par.tensor_parallel_size) == \
        (2, 1, "10.0.0.1", 1234, 16)
    assert EngineConfig.from_flags(nnodes=2, node_rank=1).parallel.node_rank == 1


def test_server_on_two_nodes_fails_streams_when_a_node_dies():
    """`jaxllm.serve` on both nodes: rank 0 serves HTTP, rank 1 follows (and never binds its port). A
    request completes; then killing rank 1 under a stream ends the stream with an error naming rank 1,
    and the server exits non-zero."""
    import httpx

    import models
    from tests.server_support import ServerProcess, sse_payloads
    port = free_port_pair()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    common = [MODEL, "--tokenizer", models.default_model_path(), "-tp", "8", "--nnodes", "2",
              "--master-port", str(port), "--max-model-len", "512", "--max-num-seqs", "4", "--no-warmup",
              "--no-param-cache", "--no-persistent-cache", "--served-model-name", "tiny"]
    nodes = [ServerProcess(common + ["--node-rank", str(r)], env=env) for r in (0, 1)]
    try:
        nodes[0].wait_ready(300)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(nodes[0].base_url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        body = dict(body, max_tokens=480, stream=True)
        with httpx.stream("POST", nodes[0].base_url + "/v1/completions", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            nodes[1].proc.kill()
            t0 = time.monotonic()
            rest = list(lines)
        payloads = sse_payloads([first] + rest)
        errors = [p["error"]["message"] for p in payloads if isinstance(p, dict) and "error" in p]
        assert errors and "node rank 1 of 2" in errors[0], payloads[-3:]
        assert nodes[0].proc.wait(30) != 0
        assert time.monotonic() - t0 < 20
        assert "node rank 1 of 2" in nodes[0].log_text()
    finally:
        for n in nodes:
            n.proc.kill()


def test_run_batch_on_two_nodes(tmp_path):
    """`jaxllm.run_batch` with the same flags on both nodes: rank 0 reads and writes the files, rank 1
    follows; both exit 0. The param cache is on (the default), in an empty directory: weights split over
    hosts cannot be saved, which must not fail the load."""
    import models
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {"model": "tiny", "prompt": [5, 6 + i, 7], "max_tokens": 6,
                                                "temperature": 0}}) + "\n" for i in range(4)))
    port = free_port_pair()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "jaxllm.run_batch", MODEL, "--tokenizer", models.default_model_path(), "-tp", "8",
            "--nnodes", "2", "--master-port", str(port), "--no-warmup", "--cache-dir", str(tmp_path / "cache"),
            "--no-persistent-cache",
            "--served-model-name", "tiny", "--no-progress", "-i", str(src), "-o", str(tmp_path / "out.jsonl")]
    procs = [subprocess.Popen(args + ["--node-rank", str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-4000:] + outs[0][1][-4000:]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == ["r0", "r1", "r2", "r3"]
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 6 for r in records)
