"""What a step's padding rows cost in the quantized projections (CPU, ggml's custom call):

  python benchmarks/padding_rows.py [--model M.gguf] [--bucket 96] [--live 67] [--rounds 15]

Every projection of the model's layers (q/k/v, o, gate/up, down: the calls a step makes, with the
weights as `-q gguf` loads them, AMX-packed where the CPU has AMX) applied to a `--bucket`-row input,
once with every row live (what each step paid for its padding before the layer scan passed the live
row count) and once with `--live` rows, alternating in one process. Prints min and median ms of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--bucket", type=int, default=96, help="rows of the step as compiled")
    p.add_argument("--live", type=int, default=67, help="rows of it that are real tokens")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)

    from models.registry import load_model
    from pallas_kernels.quantized_matmul import quantized_matmuls
    model = load_model(args.model, quantization="gguf").model
    group = model.groups[0]  # a model whose layers form several groups: its first group only
    attn, mlp = group.attn, group.mlp
    weights = {name: lin.weight.get_value() for name, lin in (
        ("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
        ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj))}
    layers = weights["q"].data.shape[0]

    def projections(x, live, w):
        def layer(i, h):
            at = lambda name: w[name].at_layer(i, live)
            q, _, _ = quantized_matmuls(h, [at("q"), at("k"), at("v")])
            h = h + 1e-3 * quantized_matmuls(q, [at("o")])[0]
            g, u = quantized_matmuls(h, [at("gate"), at("up")])
            return h + 1e-3 * quantized_matmuls(jax.nn.silu(g) * u, [at("down")])[0]
        return jax.lax.fori_loop(0, layers, layer, x)

    run = jax.jit(projections)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.bucket, model.config.hidden_size)), jnp.float32)
    times = {args.bucket: [], args.live: []}
    for live in times:
        jax.block_until_ready(run(x, jnp.int32(live), weights))
    for _ in range(args.rounds):
        for live in times:
            t0 = time.perf_counter()
            jax.block_until_ready(run(x, jnp.int32(live), weights))
            times[live].append(1e3 * (time.perf_counter() - t0))
    for live, ms in times.items():
        print(f"{layers} layers of projections, {live} live rows of {args.bucket}: "
              f"min {min(ms):.1f} ms, median {np.median(ms):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
