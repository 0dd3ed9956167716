// The one ggml thread pool of the extension, shared by its custom calls (ggml_ffi.cc, and the CPU
// attention in pallas_kernels/ragged_paged_attention/cpu_ffi.cc).
#pragma once
#include "ggml-cpu.h"
#include "ggml.h"

// Computes `graph` on the shared pool of n_threads workers polling at `poll` (0-100). Calls from
// concurrent XLA threads take turns: the pool is not reentrant, and a second pool would only
// oversubscribe the cores.
ggml_status jaxllm_ggml_compute(ggml_cgraph* graph, int n_threads, int poll);

// Runs fn(dst, ith, nth, userdata) for ith = 0..n_threads-1 on that pool (one ggml custom op): the CPU
// attention and the sampler's row reductions split their own work items this way.
ggml_status jaxllm_run_on_pool(ggml_custom_op_t fn, void* userdata, int n_threads, int poll);
