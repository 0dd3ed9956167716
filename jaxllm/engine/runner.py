"""Builds one ragged step's inputs in NumPy, pads them to a compiled bucket, and runs the jitted step.

Two jitted programs per step, both compiled for every bucket at start-up:
  forward(params, kv_pages, token_ids[T], positions[T], md) -> (hidden[T, H], kv_pages)   T buckets
  sample(params, hidden, logits_indices[R], SamplingTensors) -> SamplerOutput             R/K/B buckets
The pool is donated to `forward` and written in place. They are split so the sampler's buckets (rows
that need logits, penalty and bias slots) do not multiply the model's: the hidden states stay on
device between the two calls, and only sampled ids and logprobs come back to the host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.engine.sampler import RowSpec, SamplerOutput, SamplingTensors, bucket, sample
from jaxllm.engine.scheduler import ScheduledBatch
from models.base import AttentionMetadata

logger = logging.getLogger(__name__)

NUM_TOP_LOGPROBS = 20  # OpenAI's maximum; always computed so any request can ask for up to this many
_MIN_TOKEN_BUCKET = 16


@dataclass
class LogitsRow:
    """One row of the step that needs logits: `flat_row` indexes the ragged token batch."""

    flat_row: int
    spec: RowSpec


@dataclass
class StepInputs:
    token_ids: np.ndarray  # [T] i32
    positions: np.ndarray  # [T] i32
    md: AttentionMetadata  # NumPy arrays, device_put with the rest
    row_offsets: list[int]  # first flat row of each scheduled sequence


class ModelRunner:
    def __init__(self, model: nnx.Module, model_config, *, num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, kv_dtype=jnp.float32):
        self.page_size = page_size
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.graphdef, self.params = nnx.split(model)
        self.kv_pages = jnp.zeros(model_config.kv_pool_shape(num_pages, page_size), kv_dtype)
        top = bucket(max_num_batched_tokens, _MIN_TOKEN_BUCKET)
        self.token_buckets = [b for b in (1 << i for i in range(4, 20)) if b <= top]
        self.max_seqs = bucket(max_num_seqs)
        # Rows needing logits: every sequence samples, n > 1 forks sample several times from one row,
        # and prompt_logprobs adds a row per prompt token of the chunk.
        self.row_buckets = [1 << i for i in range(3, bucket(max_num_batched_tokens + max_num_seqs).bit_length())]
        self.max_penalty_slots = bucket(max_model_len)
        self.max_bias_slots = 512  # OpenAI allows 300 logit_bias entries; the rest is stop/eos suppression
        self.compiled: set[tuple] = set()
        self.warmed_up = False
        self.num_recompiles = 0
        self.compile_seconds = 0.0
        self._forward = jax.jit(self._forward_impl, donate_argnums=(1,))
        self._sample = jax.jit(self._sample_impl)

    # ---- jitted bodies ------------------------------------------------------------------------

    def _forward_impl(self, params, kv_pages, token_ids, positions, md):
        model = nnx.merge(self.graphdef, params)
        hidden, kv_pages = model(token_ids, positions, kv_pages, md)
        # One hidden shape for every token bucket, so sampler programs are shared across them.
        hidden = jnp.pad(hidden, ((0, self.token_buckets[-1] - hidden.shape[0]), (0, 0)))
        return hidden, kv_pages

    def _sample_impl(self, params, hidden, logits_indices, tensors):
        model = nnx.merge(self.graphdef, params)
        logits = model.compute_logits(hidden[logits_indices])
        return sample(logits, tensors, num_top_logprobs=NUM_TOP_LOGPROBS)

    # ---- host side ----------------------------------------------------------------------------

    def token_bucket(self, n: int) -> int:
        for b in self.token_buckets:
            if b >= n:
                return b
        raise ValueError(f"step of {n} tokens exceeds the largest bucket {self.token_buckets[-1]}")

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Flattens the scheduled sequences into one padded ragged batch.

        Reorders `batch` in place: single-token (decode) rows first, by context length, so that
        attention tiles hold rows of similar length; then prefill chunks.
        """
        order = sorted(range(len(batch.seqs)), key=lambda i: (batch.num_tokens[i] > 1,
                                                              batch.seqs[i].num_computed_tokens))
        batch.seqs[:] = [batch.seqs[i] for i in order]
        batch.num_tokens[:] = [batch.num_tokens[i] for i in order]
        T = self.token_bucket(batch.total_tokens)
        S = min(T, self.max_seqs)
        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slots = np.full(T, -1, np.int32)
        cu = np.zeros(S + 1, np.int32)
        kv_lens = np.zeros(S, np.int32)
        page_table = np.zeros((S, self.max_pages_per_seq), np.int32)
        offsets, row = [], 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            pages = np.asarray(seq.pages, np.int32)
            token_ids[row:row + n] = seq.token_ids[start:start + n]
            positions[row:row + n] = pos
            slots[row:row + n] = pages[pos // self.page_size] * self.page_size + pos % self.page_size
            page_table[i, :len(pages)] = pages
            kv_lens[i] = start + n
            offsets.append(row)
            row += n
            cu[i + 1] = row
        cu[len(batch.seqs) + 1:] = row
        md = AttentionMetadata(slot_mapping=slots, kv_lens=kv_lens, page_table=page_table, cu_q_lens=cu,
                               num_seqs=np.array([len(batch.seqs)], np.int32))
        return StepInputs(token_ids, positions, md, offsets)

    def execute(self, inputs: StepInputs, rows: list[LogitsRow]) -> SamplerOutput | None:
        """Runs the step; returns the sampler's outputs for `rows` (NumPy, in order) or None."""
        hidden = self._run_forward(inputs.token_ids, inputs.positions, inputs.md)
        if not rows:
            return None
        R = self._row_bucket(len(rows))
        tensors = SamplingTensors.build([r.spec for r in rows], R=R, K=self._slots(rows, "penalty"),
                                        B=self._slots(rows, "bias"))
        indices = np.zeros(R, np.int32)
        indices[:len(rows)] = [r.flat_row for r in rows]
        out = self._run_sample(hidden, indices, tensors)
        return jax.tree.map(lambda a: np.asarray(a)[:len(rows)], out)

    def _row_bucket(self, n: int) -> int:
        for b in self.row_buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} logits rows exceed the largest bucket {self.row_buckets[-1]}")

    def _slots(self, rows: list[LogitsRow], kind: str) -> int:
        """Penalty / bias slots: 1 when no row uses them, else the one compiled maximum."""
        if kind == "penalty":
            used = max(len(r.spec.penalty_ids) for r in rows)
            return 1 if used == 0 else max(self.max_penalty_slots, bucket(used))
        used = max(len(r.spec.bias or ()) for r in rows)
        return 1 if used == 0 else max(self.max_bias_slots, bucket(used))

    def _track(self, signature: tuple) -> None:
        if signature in self.compiled:
            return
        self.compiled.add(signature)
        if self.warmed_up:
            self.num_recompiles += 1
            logger.warning("compiling %s after warm-up (recompile #%d): a bucket was missed", signature,
                           self.num_recompiles)

    def _run_forward(self, token_ids, positions, md):
        self._track(("forward", len(token_ids)))
        hidden, self.kv_pages = self._forward(self.params, self.kv_pages, token_ids, positions, md)
        return hidden

    def _run_sample(self, hidden, indices, tensors):
        self._track(("sample", len(indices), tensors.penalty_ids.shape[1], tensors.bias_ids.shape[1]))
        return self._sample(self.params, hidden, indices, tensors)

    # ---- warm-up ------------------------------------------------------------------------------

    def warmup(self) -> float:
        """Compiles every bucket with all-padding inputs (they write nothing to the pool)."""
        t0 = time.perf_counter()
        for T in self.token_buckets:
            S = min(T, self.max_seqs)
            md = AttentionMetadata(slot_mapping=np.full(T, -1, np.int32), kv_lens=np.zeros(S, np.int32),
                                   page_table=np.zeros((S, self.max_pages_per_seq), np.int32),
                                   cu_q_lens=np.zeros(S + 1, np.int32), num_seqs=np.zeros(1, np.int32))
            hidden = self._run_forward(np.zeros(T, np.int32), np.zeros(T, np.int32), md)
        for R in self.row_buckets:
            variants = [(1, 1)]
            if R <= self.max_seqs:  # penalties / logit_bias / min_tokens apply to generated tokens
                variants += [(self.max_penalty_slots, 1), (1, self.max_bias_slots),
                             (self.max_penalty_slots, self.max_bias_slots)]
            for K, B in variants:
                tensors = SamplingTensors.build([], R=R, K=K, B=B)
                jax.block_until_ready(self._run_sample(hidden, np.zeros(R, np.int32), tensors))
        jax.block_until_ready(self.kv_pages)
        self.warmed_up = True
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds
