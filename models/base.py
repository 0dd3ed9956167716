"""What every model family gives the engine: the step's attention metadata and the model contract."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where a ragged step's rows live in the page pool (all device arrays; see pallas_kernels).

    slot_mapping: [T] int32  page * page_size + offset for each row's new K/V; -1 for padding rows
    kv_lens:      [S] int32  tokens in the pool per sequence after this step's writes
    page_table:   [S, max_pages_per_seq] int32
    cu_q_lens:    [S + 1] int32 row offsets of each sequence in the flat batch
    num_seqs:     [1] int32 live sequences (the rest of S is padding)
    """

    slot_mapping: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array


class CausalLM(Protocol):
    """Contract between the engine's runner and a Flax NNX model family.

    kv pool: one array [num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim] (K/V interleaved
    along heads), threaded through the layer scan as a carry and updated in place.
    """

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_pages: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """token_ids, positions: [T] int32 -> (hidden [T, hidden_size], updated kv_pages)."""

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [R, hidden_size] -> float32 logits [R, vocab_size] (only rows that need them)."""
