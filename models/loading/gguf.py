"""GGUF (llama.cpp) checkpoints: metadata -> TransformerConfig, tensors -> dense canonical weights.

The header is parsed by gguf_file.py (tensor bytes stay memory-mapped); dequantization is the `gguf`
package's vectorized NumPy (gguf.quants.dequantize). Tensors come back in HF layout [out, in]: GGUF
lists dims fastest-first, and the NumPy view is already row-major.
"""

from __future__ import annotations

import numpy as np

from models.loading.errors import CheckpointError
from models.loading.gguf_file import GGUFFile, GGUFTensor, read_gguf

# Types we dequantize (all via gguf.quants); anything else fails at load with the tensor's name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def open_gguf(path: str) -> GGUFFile:
    """Metadata and memory-mapped tensors of a GGUF file (see gguf_file.py)."""
    return read_gguf(path)


def dequantize(tensor: GGUFTensor, path: str = "<gguf>") -> np.ndarray:
    """One tensor -> float32 ndarray of shape reversed(tensor.shape) ([out, in] for a matrix)."""
    import gguf  # deferred: only GGUF loads need it

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} has quantization type {kind}, which is not "
                              f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return data.reshape(shape)


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation for llama-arch models ([out, in] -> HF layout).

    llama.cpp reorders each head's rows from HF's rotate-half layout (first half, second half) to
    interleaved pairs (x0, y0, x1, y1, ...) for its own rope; we rope in HF's convention.
    """
    out_dim = w.shape[0]
    head_dim = out_dim // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_weights(file: GGUFFile, config, specs, sources, dtype, finalize=None,
                 keep_quantized: bool = False) -> dict[str, np.ndarray]:
    """Canonical stacked weights of a GGUF file (see models.loading.weights.assemble). keep_quantized:
    block-quantized projections, embedding and head stay packed as the file stores them (QuantizedArray)."""
    from models.loading.weights import assemble
    from pallas_kernels.quantized_matmul import GGML_FORMATS
    tensors = {t.name: t for t in file.tensors}

    def get(name):
        t = tensors.get(name)
        return None if t is None else dequantize(t, file.path)

    def packed(name):
        t = tensors.get(name)
        fmt = None if t is None else t.tensor_type.name.lower()
        return (fmt, np.asarray(t.data)) if fmt in GGML_FORMATS else None

    return assemble(config, specs, sources, get, file.path, dtype, finalize, packed if keep_quantized else None)
