"""Ragged paged attention benchmark: decode, prefill and mixed batches.

  python -m benchmarks.kernels            # full sweep on the default device (GPU / TPU)
  python -m benchmarks.kernels --small    # tiny shapes, reference only: proves it runs (CPU)
  python -m benchmarks.kernels --backend cpu --dtype float32 --kv-dtype bfloat16 --num-q-heads 9 \
      --num-kv-heads 3 --head-dim 64 --no-compare --case 60:652 --case 60:652,1:600x7 --case 512:512
                                          # given batches (q_len:kv_len, xN repeats), SmolLM2's shapes

Decode rows report achieved HBM GB/s (bytes of K/V read + q/out), prefill rows achieved TFLOP/s
(4 * D * Hq per visible query-key pair; causal pairs only), each next to the device peak. Beside our
kernel the same shapes run through JAX's shipped kernels (TPU: ops.tpu.ragged_paged_attention, same
pool layout; GPU: ops.gpu.paged_attention, decode only, K and V as separate head-major pools) and dense
`jax.nn.dot_product_attention` on contiguous K/V (no paging: an upper bound on what paging costs).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, resolve_backend

# (HBM GB/s, dense bf16 TFLOP/s) by substring of device_kind, lowercase.
PEAKS = {
    "h200": (4800, 989), "h100": (3350, 989), "a100": (2039, 312), "l40s": (864, 362), "l4": (300, 121),
    "v6": (1640, 918), "v5p": (2765, 459), "v5 lite": (819, 197), "v5e": (819, 197), "v4": (1228, 275),
}


def device_peaks():
    kind = jax.devices()[0].device_kind.lower()
    for key, peak in PEAKS.items():
        if key in kind:
            return kind, peak
    return kind, (None, None)


def make_case(seqs, *, num_q_heads, num_kv_heads, head_dim, page_size, dtype, kv_dtype, seed=0):
    """Device arrays for a ragged batch: seqs = [(q_len, kv_len)], pages laid out contiguously."""
    rng = np.random.default_rng(seed)
    need = [-(-kv // page_size) for _, kv in seqs]
    num_pages = sum(need) + 1
    max_pages = max(need)
    page_table = np.zeros((len(seqs), max_pages), np.int32)
    perm = rng.permutation(num_pages)
    start = 0
    for i, n in enumerate(need):
        page_table[i, :n] = perm[start:start + n]
        start += n
    cu = np.concatenate([[0], np.cumsum([q for q, _ in seqs])]).astype(np.int32)
    kv_lens = np.array([kv for _, kv in seqs], np.int32)
    key = jax.random.key(seed)
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (int(cu[-1]), num_q_heads, head_dim), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (num_pages, page_size, 2 * num_kv_heads, head_dim), jnp.float32)
    if jnp.dtype(kv_dtype) == jnp.int8:
        kv = jnp.clip(jnp.round(kv * 40), -127, 127)
    kv = kv.astype(kv_dtype)
    return dict(q=q, kv_pages=kv, kv_lens=jnp.asarray(kv_lens), page_table=jnp.asarray(page_table),
                cu_q_lens=jnp.asarray(cu), num_seqs=jnp.asarray([len(seqs)], jnp.int32))


def traffic(seqs, *, num_q_heads, num_kv_heads, head_dim, dtype, kv_dtype):
    """(bytes moved at minimum, causal attention FLOPs)."""
    kv_bytes = sum(kv for _, kv in seqs) * 2 * num_kv_heads * head_dim * jnp.dtype(kv_dtype).itemsize
    rows = sum(q for q, _ in seqs)
    qo_bytes = 2 * rows * num_q_heads * head_dim * jnp.dtype(dtype).itemsize
    pairs = sum(sum(kv - q + i + 1 for i in range(q)) for q, kv in seqs)
    return kv_bytes + qo_bytes, 4 * pairs * num_q_heads * head_dim


def bench(fn, args, iters=10, calls_per_iter=20):
    """Median device time (s) of a jitted call, after compile + one warm-up.

    Each timing enqueues `calls_per_iter` calls back to back and waits once, so the host's dispatch
    cost (tens of microseconds, comparable to a decode step's kernel) overlaps the device's work.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(calls_per_iter):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls_per_iter)
    return float(np.median(times))


def ours(case, *, sm_scale, backend, interpret):
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=sm_scale, backend=backend,
                                   interpret=interpret))
    return fn, (case["q"], case["kv_pages"], case["kv_lens"], case["page_table"], case["cu_q_lens"],
                case["num_seqs"])


def shipped(case, impl, *, sm_scale, decode):
    """JAX's own kernel on the same batch, or None where it does not apply."""
    if impl == "tpu":
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel
        fn = jax.jit(functools.partial(kernel.ragged_paged_attention, sm_scale=sm_scale))
        return fn, (case["q"], case["kv_pages"], case["kv_lens"], case["page_table"], case["cu_q_lens"],
                    case["num_seqs"])
    if impl == "gpu" and decode:
        from jax.experimental.pallas.ops.gpu import paged_attention
        kv = case["kv_pages"]
        k = jnp.moveaxis(kv[:, :, 0::2], 2, 0)  # [Hkv, num_pages, page_size, D]
        v = jnp.moveaxis(kv[:, :, 1::2], 2, 0)
        fn = jax.jit(lambda q, k, v, t, n: paged_attention.paged_attention(q * sm_scale, k, v, t, n))
        return fn, (case["q"], k, v, case["page_table"], case["kv_lens"])
    return None


def dense(seqs, case, *, sm_scale):
    """jax.nn.dot_product_attention over contiguous [B, L, H, D] K/V (uniform batches only)."""
    q_len, kv_len = seqs[0]
    if any(s != seqs[0] for s in seqs) or q_len not in (1, kv_len):
        return None
    b = len(seqs)
    hq, d = case["q"].shape[1:]
    hkv = case["kv_pages"].shape[2] // 2
    key = jax.random.key(1)
    k = jax.random.normal(key, (b, kv_len, hkv, d), jnp.float32).astype(case["q"].dtype)
    q = case["q"].reshape(b, q_len, hq, d)
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=sm_scale, is_causal=q_len > 1))
    return fn, (q, k, k)


def scenarios(small: bool):
    if small:
        return {
            "decode": [[(1, c)] * b for b in (1, 4) for c in (128, 256)],
            "prefill": [[(c, c)] for c in (64, 128)],
            "mixed": [[(1, 200)] * 3 + [(64, 192)]],
        }
    return {
        # Batch 16 at context 4k and the 4k prefill are the H100 targets.
        "decode": [[(1, c)] * b for b in (1, 8, 16, 32, 128, 256) for c in (128, 1024, 4096, 8192)
                   if b * c <= 256 * 8192],
        "prefill": [[(c, c)] for c in (512, 2048, 4096, 8192)] + [[(2048, 8192)]],
        "mixed": [[(1, 2048)] * 64 + [(512, 1024)], [(1, 4096)] * 128 + [(2048, 2048)]],
    }


def parse_case(text: str) -> list[tuple[int, int]]:
    """"60:652,1:600x7" -> [(60, 652)] + [(1, 600)] * 7"""
    seqs = []
    for part in text.split(","):
        spec, _, times = part.partition("x")
        q_len, kv_len = (int(v) for v in spec.split(":"))
        if not 0 < q_len <= kv_len:
            raise argparse.ArgumentTypeError(f"--case {part!r}: need 0 < q_len <= kv_len")
        seqs += [(q_len, kv_len)] * int(times or 1)
    return seqs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes, reference only (runs on CPU)")
    p.add_argument("--backend", default=None, choices=["auto", "reference", "tpu", "gpu", "cpu"])
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernel interpreted")
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-dtype", default=None, help="default: --dtype (int8 / float8_e4m3fn to quantize)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compare", action="store_true", help="skip shipped kernels and dense attention")
    p.add_argument("--case", type=parse_case, action="append", default=None,
                   help="a batch to time instead of the sweep: q_len:kv_len[xN],... (repeatable)")
    args = p.parse_args(argv)

    backend = args.backend or ("reference" if args.small else "auto")
    if args.small:
        args.num_q_heads, args.num_kv_heads, args.head_dim = min(args.num_q_heads, 4), 2, 64
        args.iters = min(args.iters, 3)
    calls = 1 if args.small else 20  # CPU: no dispatch to hide, and slow calls
    impl = resolve_backend(backend, args.interpret)
    dtype = jnp.dtype(args.dtype)
    kv_dtype = jnp.dtype(args.kv_dtype or args.dtype)
    shape = dict(num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim)
    sm_scale = args.head_dim ** -0.5
    kind, (peak_bw, peak_tflops) = device_peaks()
    print(f"device: {kind}  ours: {impl}  peak: {peak_bw or '?'} GB/s, {peak_tflops or '?'} TFLOP/s  "
          f"q {dtype.name} kv {kv_dtype.name} Hq={args.num_q_heads} Hkv={args.num_kv_heads} "
          f"D={args.head_dim} page={args.page_size}")
    print(f"{'case':<34}{'ours ms':>10}{'GB/s':>9}{'TFLOP/s':>9}{'shipped ms':>12}{'dense ms':>10}")
    for name, cases in ({"case": args.case} if args.case else scenarios(args.small)).items():
        for seqs in cases:
            case = make_case(seqs, page_size=args.page_size, dtype=dtype, kv_dtype=kv_dtype, **shape)
            nbytes, flops = traffic(seqs, dtype=dtype, kv_dtype=kv_dtype, **shape)
            t = bench(*ours(case, sm_scale=sm_scale, backend=backend, interpret=args.interpret),
                      iters=args.iters, calls_per_iter=calls)
            other = {"shipped": None, "dense": None}
            if not args.no_compare:
                for label, make in (("shipped", lambda: shipped(case, impl, sm_scale=sm_scale,
                                                                decode=name == "decode")),
                                    ("dense", lambda: dense(seqs, case, sm_scale=sm_scale))):
                    try:
                        made = make()
                        other[label] = None if made is None else bench(*made, iters=args.iters,
                                                                          calls_per_iter=calls)
                    except Exception as e:  # noqa: BLE001 -- a comparison point may not run here
                        other[label] = f"err:{type(e).__name__}"
            q_len, kv_len = max(seqs)  # the batch's longest query (a mixed batch's prefill)
            desc = f"{name} b={len(seqs)} q={q_len} kv={kv_len}"
            fmt = lambda x: "-" if x is None else (x if isinstance(x, str) else f"{x * 1e3:.3f}")
            print(f"{desc:<34}{t * 1e3:>10.3f}{nbytes / t / 1e9:>9.1f}{flops / t / 1e12:>9.2f}"
                  f"{fmt(other['shipped']):>12}{fmt(other['dense']):>10}")


if __name__ == "__main__":
    main()
