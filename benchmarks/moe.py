"""MoE layer micro-benchmark: the ragged grouped matmul (models.layers.moe_forward, what the models run)
against a dense einsum that runs every token through every expert and masks by the routing.

    python benchmarks/moe.py [--tokens 16 256] [--experts 8 64] [--hidden 512] [--inter 256] [--top-k 2]

Prints one row per (tokens, experts): median milliseconds of each over --iters calls, compiled.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import ACTIVATIONS, moe_forward, route


def dense_moe(x, weights, experts, gate, up, down):
    """Every expert on every token: [T, E, I] intermediates, then the routing weights mask the sum."""
    num_experts = gate.shape[0]
    combine = jnp.zeros((x.shape[0], num_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
    h = ACTIVATIONS["silu"](jnp.einsum("th,ehi->tei", x, gate)) * jnp.einsum("th,ehi->tei", x, up)
    y = jnp.einsum("tei,eih->teh", h, down)
    return jnp.einsum("teh,te->th", y, combine.astype(y.dtype))


def bench(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    dt = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"{'tokens':>6} {'experts':>7} {'ragged ms':>10} {'dense ms':>9} {'dense/ragged':>12}   "
          f"(H={args.hidden}, I={args.inter}, top-{args.top_k}, {dt.name}, {jax.devices()[0].platform})")
    for e in args.experts:
        gate = jnp.asarray(rng.normal(0, 0.05, (e, args.hidden, args.inter)), dt)
        up = jnp.asarray(rng.normal(0, 0.05, (e, args.hidden, args.inter)), dt)
        down = jnp.asarray(rng.normal(0, 0.05, (e, args.inter, args.hidden)), dt)
        router = jnp.asarray(rng.normal(0, 0.05, (args.hidden, e)), dt)
        for t in args.tokens:
            x = jnp.asarray(rng.normal(size=(t, args.hidden)), dt)
            w, ex = route(x, router, args.top_k, True)
            ragged = bench(jax.jit(moe_forward), (x, w, ex, gate, up, down), args.iters)
            dense = bench(jax.jit(dense_moe), (x, w, ex, gate, up, down), args.iters)
            print(f"{t:>6} {e:>7} {ragged:>10.3f} {dense:>9.3f} {dense / ragged:>12.1f}")


if __name__ == "__main__":
    main()
