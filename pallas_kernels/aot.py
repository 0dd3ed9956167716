"""Ahead-of-time checks of the Pallas kernels for accelerators this host does not have.

jax lowers a program for another platform on request (`.lower(lowering_platforms=...)`). That runs
Pallas's own lowering of every kernel in it: Pallas -> Triton IR for "cuda", Pallas -> Mosaic for
"tpu". Most kernel bugs surface there: an op with no lowering rule, a block shape Triton refuses, an
index Mosaic cannot express. For CUDA this module goes one step further when the `triton` package is
installed: it compiles each kernel's Triton IR to a cubin for a chosen compute capability and reads
back its registers, shared memory and local memory (spills). Those decide whether the kernel
launches at all and how many of its blocks share an SM.

What it cannot tell: whether a kernel is right or fast on the device (tests/test_attention_kernels.py
and benchmarks/kernels.py, run there, do), which Triton version XLA bundles (pip's compiles here), or
whether Mosaic's own compiler, which only runs on a TPU host, accepts the lowered kernel.

    python -m pallas_kernels.aot            # lower + compile the attention kernel for an H100 and a TPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp


def lower(fn, *args, platform: str):
    """jax.jit(fn) lowered for `platform` ("cuda", "rocm", "tpu", "cpu") from avals or arrays."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


@contextlib.contextmanager
def tpu_target(chip: str = "v6e"):
    """Let Pallas's Mosaic lowering run on a host without a TPU, targeting `chip` ("v5e", "v6e", ...).

    A few Mosaic lowering rules ask the local device which TPU generation they build for; on a CPU
    host that question has no answer, so the host's device kind is mapped to `chip` for the duration.
    """
    try:
        from jax._src.pallas.mosaic import tpu_info  # no public hook for this in jax 0.10
        tpu_info.registry, tpu_info.get_tpu_info_for_chip, tpu_info.ChipVersion  # noqa: B018
    except (ImportError, AttributeError) as e:
        raise NotImplementedError(f"this jax ({jax.__version__}) has moved Mosaic's chip registry: {e}")

    kind = jax.devices()[0].device_kind
    if tpu_info.chip_version_from_device_kind(kind) is not None:
        yield  # a real TPU: nothing to pretend
        return
    had, previous = kind in tpu_info.registry, tpu_info.registry.get(kind)
    tpu_info.registry[kind] = lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion(chip), 1)
    try:
        yield
    finally:
        if had:
            tpu_info.registry[kind] = previous
        else:
            del tpu_info.registry[kind]


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas-Triton kernel as XLA would receive it: its Triton IR and launch parameters."""
    name: str
    ir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def triton_kernels(lowered) -> list[TritonKernel]:
    """The Triton kernels of a program lowered for "cuda", IR as text (XLA gets it as bytecode)."""
    from jax._src.lib import triton as triton_lib
    from jax._src.lib.mlir import ir

    calls = []

    def visit(op):
        op = op.operation
        if op.name == "stablehlo.custom_call" and "triton" in str(op.attributes["call_target_name"]):
            calls.append(op.attributes["mhlo.backend_config"])
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    kernels = []
    for config in calls:
        with ir.Context() as ctx:
            triton_lib.dialect.register_dialect(ctx)
            module = ir.Module.parse(config["ir"].value_bytes)
            text = module.operation.get_asm(enable_debug_info=False)
        kernels.append(TritonKernel(
            name=config["name"].value, ir=text, num_warps=config["num_warps"].value,
            num_stages=config["num_stages"].value,
            grid=tuple(config[f"grid_{axis}"].value for axis in "xyz")))
    return kernels


@dataclasses.dataclass(frozen=True)
class CubinStats:
    registers: int  # per thread; 255 is the hardware limit
    shared_bytes: int  # per block, Triton's pipelining buffers included
    local_bytes: int  # per thread; > 0 means register spills


def compile_triton(kernel: TritonKernel, capability: int = 90) -> CubinStats:
    """Compile `kernel` with pip's Triton for sm_<capability> and read back its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence a warning
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(src, "w") as f:
            f.write(kernel.ir)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages))
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))  # noqa: E731
    # SHARED in the cubin is static shared memory only; Triton's buffers are dynamic (metadata).
    return CubinStats(registers=field("REG"), shared_bytes=compiled.metadata.shared + field("SHARED"),
                      local_bytes=field("LOCAL"))


# H100 / H200: 227 KiB of shared memory per block at most (the rest of the SM's 228 KiB is reserved).
HOPPER_MAX_SHARED_BYTES = 227 * 1024


def attention_avals(*, num_rows: int, num_seqs: int, context: int, num_q_heads: int, num_kv_heads: int,
                    head_dim: int, page_size: int, q_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16,
                    num_layers: int | None = None):
    """Abstract arguments of ragged_paged_attention for a batch of `num_seqs` sequences."""
    pages_per_seq = -(-context // page_size)
    pool = (num_seqs * pages_per_seq, page_size, 2 * num_kv_heads, head_dim)
    if num_layers is not None:
        pool = (num_layers,) + pool
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    return (jax.ShapeDtypeStruct((num_rows, num_q_heads, head_dim), q_dtype),
            jax.ShapeDtypeStruct(pool, kv_dtype), i32(num_seqs), i32(num_seqs, pages_per_seq),
            i32(num_seqs + 1), i32(1))


# Shapes like those benchmarks/kernels.py measures on a GPU, its two targets first (Llama-3-8B heads,
# bf16, page 16).
REPORT_SHAPES = {
    "decode b16 ctx4k": dict(num_rows=16, num_seqs=16, context=4096),
    "decode b128 ctx1k": dict(num_rows=128, num_seqs=128, context=1024),
    "prefill 4k": dict(num_rows=4096, num_seqs=1, context=4096),
    "mixed 2x512 + 62 decode": dict(num_rows=1086, num_seqs=64, context=2048),
}


def main(argv=None):
    from pallas_kernels.ragged_paged_attention import gpu, tpu

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability (90: H100)")
    parser.add_argument("--tpu-chip", default="v6e")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
        have_triton = True
    except ImportError:
        have_triton = False
        print("triton is not installed: lowering only (pip install triton to compile cubins)")

    heads = dict(num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                 page_size=args.page_size)
    for label, shape in REPORT_SHAPES.items():
        avals = attention_avals(**shape, **heads)
        sm_scale = args.head_dim ** -0.5
        kernels = triton_kernels(lower(lambda *a: gpu.ragged_paged_attention(*a, sm_scale=sm_scale),
                                       *avals, platform="cuda"))
        line = f"{label:>26}  cuda: grid {kernels[0].grid}, {kernels[0].num_warps} warps"
        if have_triton:
            stats = compile_triton(kernels[0], args.capability)
            line += (f", {stats.registers} regs, {stats.shared_bytes / 1024:.0f} KiB shared, "
                     f"{stats.local_bytes} B local")
        with tpu_target(args.tpu_chip):
            lower(lambda *a: tpu.ragged_paged_attention(*a, sm_scale=sm_scale), *avals, platform="tpu")
        print(line + f"  |  tpu ({args.tpu_chip}): lowered")


if __name__ == "__main__":
    main()
