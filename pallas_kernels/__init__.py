"""Attention kernels over jaxllm's KV page pool. See ragged_paged_attention/."""

from pallas_kernels.ragged_paged_attention import QuantizedPages, allocate_pages, ragged_paged_attention, write_kv

__all__ = ["ragged_paged_attention", "write_kv", "QuantizedPages", "allocate_pages"]
