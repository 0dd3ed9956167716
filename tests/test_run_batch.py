"""`python -m jaxllm.run_batch`: bodies equal the server's (default model, gs:// -> gs:// through a GCS
emulator started here), kill -9 at chosen and random points then resume -> every line exactly once with
the uninterrupted run's bodies, bad lines -> error records, unusable paths -> an immediate error."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import models
from tests.server_support import ROOT, ServerProcess, free_port

TINY = os.path.join(ROOT, "tests", "data", "tiny-llama")
TINY_FLAGS = ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "128"]
pytestmark = pytest.mark.timeout(900)


def batch_line(cid, url, body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


BAD_LINES = [
    "{not json",
    json.dumps(["a", "list"]),
    json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "no custom_id"}}),
    batch_line("bad-url", "/v1/embeddings", {"input": "x"}),
    batch_line("bad-param", "/v1/completions", {"prompt": "x", "temperature": -1}),
    batch_line("bad-type", "/v1/chat/completions", {"messages": "not a list"}),
    batch_line("too-long", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}),
    batch_line("stream", "/v1/completions", {"prompt": "x", "stream": True}),
]


def tiny_input(n: int = 24) -> str:
    """Token-id prompts: the tiny checkpoint's vocabulary (512) is smaller than its tokenizer's."""
    rng = random.Random(0)
    lines = []
    for i in range(n):
        body = {"prompt": [rng.randrange(1, 512) for _ in range(rng.randrange(3, 40))], "max_tokens": 12,
                "temperature": 0, "ignore_eos": True}
        if i % 7 == 3:
            body.update(n=2, temperature=0.8, seed=i)
        if i % 5 == 1:
            body["prompt"] = [body["prompt"], [7, 8, 9]]
        lines.append(batch_line(f"req-{i}", "/v1/completions", body))
    lines[5:5] = BAD_LINES[:4]
    lines.append("")  # blank lines are skipped
    return "\n".join(lines) + "\n"


def read_output(path_or_bytes) -> list[dict]:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def by_id(records: list[dict]) -> dict[str, dict]:
    out = {}
    for rec in records:
        assert rec["id"] not in out, f"duplicate record {rec['id']} ({rec['custom_id']})"
        body = dict(rec["response"]["body"])
        body.pop("created", None)
        if isinstance(body.get("usage"), dict):
            # how much of a prompt the prefix cache held depends on what the process ran before it (a
            # resumed job, another worker), not on the request
            body["usage"] = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
        out[rec["id"]] = {"custom_id": rec["custom_id"], "status": rec["response"]["status_code"], "body": body}
    return out


def first_difference(a, b, path="") -> str | None:
    """Where two JSON bodies differ (floats within 1e-3 count as equal), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{i}]"))), None)
    if isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-3:
        return None  # logprobs: float32 sums in another batch composition differ in the last bits
    return None if a == b else f"{path}: {a!r} != {b!r}"


def run_batch(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jaxllm.run_batch", *args, "--no-progress"], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def tiny_args(inp, out, commit=2):
    return ["-i", inp, "-o", out, TINY, "--tokenizer", models.default_model_path(), *TINY_FLAGS,
            "--commit-records", str(commit)]


# ---- paths and input checks: all fail before the model loads ------------------------------------------


def test_missing_input_and_unwritable_output_fail_at_once(tmp_path, capsys):
    from jaxllm.run_batch import main
    t0 = time.perf_counter()
    missing = str(tmp_path / "nope" / "*.jsonl")
    assert main(["-i", missing, "-o", str(tmp_path / "out.jsonl")]) == 2
    assert missing in capsys.readouterr().err
    inp = tmp_path / "in.jsonl"
    inp.write_text(batch_line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_out = str(blocker / "out.jsonl")  # a path under a regular file: unwritable even for root
    assert main(["-i", str(inp), "-o", bad_out]) == 2
    assert bad_out in capsys.readouterr().err
    assert time.perf_counter() - t0 < 10  # no engine was built


def test_duplicate_custom_ids_rejected_before_any_work(tmp_path, capsys):
    from jaxllm.run_batch import main
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text(batch_line("x", "/v1/completions", {"prompt": "1"}) + "\n"
                                                 + batch_line("y", "/v1/completions", {"prompt": "2"}) + "\n")
    (tmp_path / "shards" / "b.jsonl").write_text(batch_line("y", "/v1/completions", {"prompt": "3"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["-i", str(tmp_path / "shards" / "*.jsonl"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "duplicate custom_id" in err and "'y'" in err and "b.jsonl:1" in err
    assert not out.exists() and not (tmp_path / "out.jsonl.jaxllm-job").exists()


# ---- kill -9 and resume: exactly once, identical bodies --------------------------------------------


def test_kill_at_any_point_then_resume_gives_every_line_exactly_once(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(tiny_input())
    ref_out = str(tmp_path / "ref.jsonl")
    r = run_batch(tiny_args(str(inp), ref_out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "28 requests (4 errors)" in r.stdout, r.stdout
    ref = by_id(read_output(ref_out))
    assert len(ref) == 28 and sum(v["status"] == 400 for v in ref.values()) == 4
    assert os.listdir(ref_out + ".jaxllm-job") == ["job.json"]  # parts gone, the progress record stays
    assert json.load(open(ref_out + ".jaxllm-job/job.json"))["completed"] is True

    # Chosen crash points, one per run, resuming each time: mid-write of a part, right after a part,
    # mid-assembly, after assembly before the record says so, while deleting parts.
    out = str(tmp_path / "out.jsonl")
    for point in ["part-000001.jsonl:mid", "part-000004.jsonl:after", "assemble:mid", "assemble:after",
                  "cleanup:mid"]:
        r = run_batch(tiny_args(str(inp), out), env={"JAXLLM_BATCH_CRASH": point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-3000:])
    r = run_batch(tiny_args(str(inp), out))
    assert r.returncode == 0 and "already complete" in r.stdout, r.stdout + r.stderr[-2000:]
    assert by_id(read_output(out)) == ref

    # A random point: SIGKILL from outside once a random number of parts is committed (plus jitter); and a
    # SIGTERM, which commits what is finished and exits 130.
    for seed, sig in ((1, signal.SIGKILL), (3, signal.SIGTERM)):
        rng = random.Random(seed)
        out = str(tmp_path / f"out-{seed}.jsonl")
        parts_dir = out + ".jaxllm-job"
        proc = subprocess.Popen([sys.executable, "-m", "jaxllm.run_batch", *tiny_args(str(inp), out), "--no-progress"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        want = rng.randrange(1, 10)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if os.path.isdir(parts_dir) and sum(n.startswith("part-") for n in os.listdir(parts_dir)) >= want:
                time.sleep(rng.uniform(0, 0.2))
                break
            time.sleep(0.02)
        running = proc.poll() is None
        proc.send_signal(sig)
        code = proc.wait()
        if running and sig == signal.SIGTERM:
            # 130: stopped in its loop, after committing what was finished. A SIGTERM that lands after
            # the loop (assembling / cleaning up, no handler any more) kills it; the re-run must cope.
            assert code in (130, -signal.SIGTERM), code
        r = run_batch(tiny_args(str(inp), out))
        assert r.returncode == 0, r.stderr[-3000:]
        assert by_id(read_output(out)) == ref


# ---- gs:// -> gs:// on the default model, bodies equal the server's ---------------------------------


@pytest.fixture(scope="module")
def gcs():
    """gcp-storage-emulator on 127.0.0.1, bucket `bkt`; gcsfs pointed at it (anonymous)."""
    import importlib.util
    if importlib.util.find_spec("gcsfs") is None or importlib.util.find_spec("gcp_storage_emulator") is None:
        pytest.skip("needs the gcs and test extras (gcsfs, gcp-storage-emulator)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
                             str(port), "--in-memory", "--default-bucket", "bkt"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "FSSPEC_GS_TOKEN": "anon",
           "FSSPEC_GS_PROJECT": "test",
           # gcsfs would otherwise ask the (absent) gRPC control API for the bucket type, for a minute
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before gcsfs is first imported: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT then
    import fsspec
    fsspec.config.conf["gs"] = {"token": "anon", "project": "test"}
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    deadline = time.time() + 30
    while True:
        try:
            fs.ls("bkt")
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    yield fs, env
    proc.terminate()
    proc.wait(10)
    fsspec.config.conf.pop("gs", None)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


SMOL_FLAGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--max-model-len", "256"]


def smol_requests() -> list[tuple[str, str, dict]]:
    chat = "/v1/chat/completions"
    cmpl = "/v1/completions"
    return [
        ("chat-0", chat, {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                          "max_tokens": 16, "temperature": 0}),
        ("chat-1", chat, {"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Name a color."}],
                          "max_completion_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}),
        ("chat-2", chat, {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12,
                          "temperature": 0, "stop": [","], "n": 2}),
        ("cmpl-0", cmpl, {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
        ("cmpl-1", cmpl, {"prompt": ["Once upon a time", "1, 2, 3,"], "max_tokens": 8, "temperature": 0,
                          "logprobs": 2, "echo": True}),
        ("cmpl-2", cmpl, {"prompt": [504, 3458, 282, 4649, 314], "max_tokens": 6, "temperature": 0,
                          "ignore_eos": True}),
        ("bad-param", cmpl, {"prompt": "x", "temperature": -1}),
        ("bad-logprobs", chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
        ("too-long", cmpl, {"prompt": "x", "max_tokens": 10**6}),
        ("bad-model", cmpl, {"prompt": "x", "model": "nope"}),
    ]


@pytest.mark.slow
def test_gcs_job_bodies_equal_the_server(gcs, tmp_path):
    fs, env = gcs
    reqs = smol_requests()
    lines = [batch_line(cid, url, body) for cid, url, body in reqs]
    half = len(lines) // 2
    fs.pipe("bkt/in/shard-000.jsonl", ("\n".join(lines[:half]) + "\n").encode())
    fs.pipe("bkt/in/shard-001.jsonl", ("\n".join(lines[half:] + ["{broken"]) + "\n").encode())

    srv = ServerProcess(SMOL_FLAGS)
    try:
        import httpx
        from jaxllm.run_batch import main
        # The batch job runs here while the server warms up in its subprocess.
        code = main(["-i", "gs://bkt/in/shard-*.jsonl", "-o", "gs://bkt/out/result.jsonl", *SMOL_FLAGS,
                     "--commit-records", "3", "--no-progress"])
        assert code == 0
        srv.wait_ready(600)
        expected = {}
        with httpx.Client(base_url=srv.base_url, timeout=300) as http:
            for cid, url, body in reqs:
                r = http.post(url, json=body)
                expected[cid] = (r.status_code, r.json())
    finally:
        srv.stop()
    records = read_output(fs.cat("bkt/out/result.jsonl"))
    assert len(records) == len(reqs) + 1
    got = {rec["custom_id"]: rec for rec in records}
    assert got[None]["response"]["status_code"] == 400  # the broken line
    assert "malformed JSON" in got[None]["response"]["body"]["error"]["message"]
    for cid, (status, body) in expected.items():
        rec = got[cid]
        assert rec["response"]["status_code"] == status, (cid, rec, body)
        mine = dict(rec["response"]["body"])
        if status == 200:
            assert mine["id"] == rec["response"]["request_id"]
            for k in ("id", "created"):
                mine.pop(k)
                body.pop(k)
            # Prefix-cache hits depend on which requests shared a step: the job submits all at once, the
            # server here got them one by one. Both must still report a count within the prompt.
            for b in (mine, body):
                usage = b["usage"] = dict(b["usage"])
                details = usage.pop("prompt_tokens_details")
                assert 0 <= details["cached_tokens"] <= usage["prompt_tokens"], (cid, details)
        assert first_difference(mine, body) is None, cid
    assert {c for c, (s, _) in expected.items() if s != 200} == {"bad-param", "bad-logprobs", "too-long", "bad-model"}
    # The parts are gone, the completed progress record stays; a re-run has nothing to do.
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("bkt/out/result.jsonl.jaxllm-job")] == ["job.json"]


def test_gcs_kill_and_resume_tiny(gcs, tmp_path):
    """The object-store path of the resume (direct whole-object writes, no rename): kill mid-part, resume."""
    fs, env = gcs
    fs.pipe("bkt/tiny/in.jsonl", tiny_input(12).encode())
    args = tiny_args("gs://bkt/tiny/in.jsonl", "gs://bkt/tiny/out.jsonl")
    r = run_batch(args, env={**env, "JAXLLM_BATCH_CRASH": "part-000002.jsonl:mid"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("bkt/tiny/out.jsonl.jaxllm-job")) == [
        "job.json", "part-000000.jsonl", "part-000001.jsonl"]
    r = run_batch(args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done by earlier runs" in r.stdout
    resumed = by_id(read_output(fs.cat("bkt/tiny/out.jsonl")))
    local_in = tmp_path / "in.jsonl"
    local_in.write_text(tiny_input(12))
    r = run_batch(tiny_args(str(local_in), str(tmp_path / "ref.jsonl")))
    assert r.returncode == 0
    ref = by_id(read_output(str(tmp_path / "ref.jsonl")))
    # A line without custom_id is keyed by its shard URL and line number, which differ from the local run.
    assert len(resumed) == len(ref)
    assert ({k: v for k, v in resumed.items() if v["custom_id"]} == {k: v for k, v in ref.items() if v["custom_id"]})
