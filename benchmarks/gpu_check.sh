#!/usr/bin/env bash
# What a session with an NVIDIA GPU runs for the Pallas kernels, as one device call:
#   bash benchmarks/gpu_check.sh          (logs under $OUT when set, else ./gpu_check)
# 1. tests/test_attention_kernels.py: on a GPU host the Triton kernel runs *compiled* against the
#    reference (the TPU kernel stays interpreted); tests/test_kernel_lowering.py beside it.
# 2. benchmarks/kernels.py with the GPU kernel forced, beside JAX's shipped decode kernel and dense
#    attention: the targets are decode b=16 kv=4096 (GB/s) and prefill q=kv=4096 (TFLOP/s).
# Once (1) passes on the device, add "gpu" to HARDWARE_VERIFIED in
# pallas_kernels/ragged_paged_attention/__init__.py so that backend="auto" picks the kernel.
# Needs jax with CUDA, numpy, pytest and hypothesis (all in the device image); nothing is installed.
set -uo pipefail
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$out/device.txt"
timeout 300 $py -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py \
    tests/test_kernel_lowering.py 2>&1 | tee "$out/kernel_tests.txt"
timeout 240 $py -m benchmarks.kernels --backend gpu 2>&1 | tee "$out/kernels_bench.txt"
