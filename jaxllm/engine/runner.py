"""Builds one ragged step's inputs in NumPy, pads them to a compiled shape, and runs the jitted step.

Two jitted programs per step, every shape of both declared in one `ShapeTable` and compiled at start-up:
  forward(params, kv_pages, penalty_state, prev_sampled[R_max], token_ids[T], positions[T], md, record)
      -> (hidden[T_max, H], kv_pages, penalty_state)                                   one per T bucket
  sample(params, hidden, penalty_state, logits_indices[R], row_seats[R], SamplingTensors)
      -> (SamplerOutput, sampled[R_max])                                   one per (R bucket, bias lanes)
`dispatch` only enqueues them (JAX runs them asynchronously) and `fetch` waits for the results, so the
host can schedule and prepare the next step meanwhile (async scheduling): a decode row whose input token
is still on the device names its row in the previous step's `sampled` (`from_prev`), and the forward
program reads it there.
Both programs are traced under the engine's ("data", "model") mesh (1 x 1 on one device): the pool is
split over KV heads, the penalty state, step inputs and outputs are replicated, and the model's
parameters carry their own shardings (models/sharding.py).
The pool and the penalty state are donated to `forward` and updated in place. The programs are split so
the sampler's shapes do not multiply the model's: the hidden states stay on device between the two
calls, and only sampled ids and logprobs come back to the host.

Penalty state: per seat (see the scheduler), the output-token counts and prompt-token membership over
the vocabulary, [max_num_seqs + 1, V] (the last row is scratch for padding and prompt-logprob rows).
`forward` records every token it computes into its sequence's seat, so it is always current without
the host ever sending a sequence's history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.engine.sampler import PenaltyRows, RowSpec, SamplerOutput, SamplingTensors, bucket, sample
from jaxllm.engine.scheduler import RESET_SEAT, SchedulerOutput
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from models import sharding
from models.base import AttentionMetadata

logger = logging.getLogger(__name__)

NUM_TOP_LOGPROBS = 20  # OpenAI's maximum; computed (only when a row asks) so any request can ask
MAX_BIAS_SLOTS = 512  # OpenAI allows 300 logit_bias entries; the rest is stop/eos suppression


@dataclass(frozen=True)
class ShapeTable:
    """Every compiled program shape. The runner pads each step to one of these, warm-up compiles all
    of them, and any other shape is a bug (counted as a recompile and logged)."""

    token_buckets: tuple[int, ...]  # T of forward
    row_buckets: tuple[int, ...]  # R of sample
    bias_slots: tuple[int, ...]  # B of sample: 1 (no row has a bias) or the maximum

    @classmethod
    def build(cls, max_num_batched_tokens: int, max_num_seqs: int) -> ShapeTable:
        # Powers of two, plus the 1.5x steps from 96 up: a step pads to the next bucket, and the
        # projections cost in proportion to padded rows (a 152-token step took the 256 program, 1.7x
        # the work). Below 96 a step is mostly decode rows whose padding is cheap.
        sizes = sorted({1 << i for i in range(32)} | {3 << i for i in range(5, 31)})
        top = next(b for b in sizes if b >= max_num_batched_tokens)
        # Rows needing logits: one sampled token per seat, plus prompt-logprob rows up to as many again.
        # The scheduler shortens prompt-logprob chunks to fit, so a [R, vocab] sampler temporary stays
        # small even for 256k vocabularies (a row per batched token would be 1 GiB at 512 x 262k f32).
        top_rows = 2 * bucket(max_num_seqs)
        return cls(token_buckets=tuple(b for b in sizes if b <= top),
                   row_buckets=tuple(1 << i for i in range(top_rows.bit_length())),
                   bias_slots=(1, MAX_BIAS_SLOTS))

    def programs(self) -> list[tuple]:
        return ([("forward", T) for T in self.token_buckets]
                + [("sample", R, B) for R in self.row_buckets for B in self.bias_slots] + [("pool",)])

    @staticmethod
    def pick(buckets: tuple[int, ...], n: int, what: str) -> int:
        for b in buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} {what} exceed the largest compiled bucket {buckets[-1]}")


@dataclass
class LogitsRow:
    """One row of the step that needs logits: `flat_row` indexes the ragged token batch; `seat` is
    whose penalty state applies (None for prompt-logprob rows)."""

    flat_row: int
    spec: RowSpec
    seat: int | None = None


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PenaltyRecord:
    """How a step updates the per-seat penalty state.

    token_seats [T] i32: seat of each token's sequence (out of range, so dropped, for padding)
    token_is_output [T] bool: generated token (counted) vs prompt token (marked)
    init_seats [S1] i32: the first num_inits entries are the seats a sequence starts on this step, forks
        first (they read their parent's row as the previous step left it); their counts are cleared
    init_parents [S1] i32: each one's parent seat, whose prompt marks a fork copies, or -1: marks cleared
    num_inits [] i32
    """

    token_seats: np.ndarray
    token_is_output: np.ndarray
    init_seats: np.ndarray
    init_parents: np.ndarray
    num_inits: np.ndarray


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ForwardArrays:
    """What the forward program reads from the host: plain NumPy arrays only, so that on many hosts
    rank 0 can send them to the other ranks (engine/multihost.py), which hold no engine state."""

    token_ids: np.ndarray  # [T] i32
    from_prev: np.ndarray  # [T] i32: row of the previous step's samples holding this token, or -1
    positions: np.ndarray  # [T] i32
    md: AttentionMetadata  # NumPy arrays, device_put with the rest
    record: PenaltyRecord


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SampleArrays:
    """What the sample program reads from the host (plain arrays, like ForwardArrays)."""

    logits_indices: np.ndarray  # [R] i32 flat rows needing logits
    row_seats: np.ndarray  # [R] i32 whose penalty state applies (the scratch seat for none)
    tensors: SamplingTensors


@dataclass
class StepInputs:
    forward: ForwardArrays  # the device's part
    row_offsets: list[int]  # host only: first flat row of each scheduled sequence, in SchedulerOutput order
    pool_segments: np.ndarray | None = None  # [T_max] i32: embedding requests' rows -> scheduled index


@dataclass
class PendingStep:
    """A dispatched step: device arrays that are not necessarily computed yet."""

    out: SamplerOutput | None
    sampled: jax.Array  # [R_max] i32 sampled ids, what the next step's `from_prev` indexes
    num_rows: int
    hidden: jax.Array  # the forward's output: ready when the step's model part is done
    pooled: jax.Array | None = None  # [max_seqs + 1, H] per-sequence sums of pooled hidden rows


class ModelRunner:
    def __init__(self, model: nnx.Module, model_config, *, num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, kv_dtype=jnp.float32, mesh: Mesh | None = None,
                 mirror=None):
        # The model's parameters already carry their shardings on `mesh` (models.sharding.shard_model);
        # the runner places the pool (split over KV heads) and the replicated penalty state on it, and
        # traces both programs under it so the model's shard_maps find the "model" axis.
        # mirror (many hosts, rank 0): told of every device call; it builds the same runner on the other
        # ranks from `init_args` (what rank 0 computed, e.g. num_pages from its memory budget).
        self.init_args = dict(num_pages=num_pages, page_size=page_size, max_model_len=max_model_len,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              kv_dtype=jnp.dtype(kv_dtype).name)
        self.mirror = None
        if mirror is not None:
            # Before any device work: a device_put onto a mesh spanning hosts is itself a collective
            # (jax checks the value is the same everywhere), so the other ranks must be building theirs.
            mirror.attach(self)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(1, 1)
        self.replicated = NamedSharding(self.mesh, P())
        self.pool_sharding = NamedSharding(self.mesh, sharding.pool_spec(model_config, self.mesh.shape[sharding.MODEL]))
        self.page_size = page_size
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.graphdef, self.params = nnx.split(model)
        self.kv_dtype = kv_dtype
        self.pool_shape = model_config.kv_pool_shape(num_pages, page_size)
        self.num_seats = max_num_seqs
        self.vocab_size = model_config.vocab_size
        self.mask_words = (self.vocab_size + 31) // 32  # structured-output bitmask lanes, always present
        self.shapes = ShapeTable.build(max_num_batched_tokens, max_num_seqs)
        self.max_seqs = bucket(max_num_seqs)
        self.reset_device_state()
        self.no_samples = jax.device_put(np.zeros(self.shapes.row_buckets[-1], np.int32), self.replicated)
        self.compiled: set[tuple] = set()
        self.warmed_up = False
        self.num_recompiles = 0
        self.compile_seconds = 0.0
        rep = self.replicated
        pool_out = jax.tree.map(lambda a: a.sharding, self.kv_pages)  # scales of a quantized pool included
        self._forward = jax.jit(self._forward_impl, donate_argnums=(1, 2), out_shardings=(rep, pool_out, rep))
        self._sample = jax.jit(self._sample_impl, out_shardings=rep)
        self._pool = jax.jit(self._pool_impl, out_shardings=rep)
        self.mirror = mirror  # only now: the followers' own runners made the first allocation, not a reset

    def reset_device_state(self) -> None:
        """(Re)allocates the page pool and the penalty state: at start-up, and after a failed step,
        whose donated buffers are gone."""
        if self.mirror is not None:
            self.mirror.reset()  # raises when a rank is lost: then nothing can run any more
        self.kv_pages = pallas_kernels.allocate_pages(self.pool_shape, self.kv_dtype, self.pool_sharding)
        S1 = self.num_seats + 1
        self.penalty_state = PenaltyRows(jnp.zeros((S1, self.vocab_size), jnp.int32, device=self.replicated),
                                         jnp.zeros((S1, self.vocab_size), bool, device=self.replicated))

    def bytes_per_device(self) -> dict[str, dict]:
        """{"params" | "pool": {device: bytes}}, read from the arrays' shards."""
        return {"params": sharding.bytes_per_device(self.params),
                "pool": sharding.bytes_per_device(self.kv_pages)}

    @property
    def device_bytes(self) -> int:
        return self.kv_pages.nbytes + sum(a.nbytes for a in (self.penalty_state.output_counts,
                                                              self.penalty_state.in_prompt))

    # ---- jitted bodies ------------------------------------------------------------------------

    def _forward_impl(self, params, kv_pages, state: PenaltyRows, prev_sampled, x: ForwardArrays):
        token_ids, from_prev, positions, md, rec = x.token_ids, x.from_prev, x.positions, x.md, x.record
        model = nnx.merge(self.graphdef, params)
        token_ids = jnp.where(from_prev >= 0, prev_sampled[jnp.maximum(from_prev, 0)], token_ids)
        hidden, kv_pages = model(token_ids, positions, kv_pages, md)
        # One hidden shape for every token bucket, so sampler programs are shared across them.
        hidden = jnp.pad(hidden, ((0, self.shapes.token_buckets[-1] - hidden.shape[0]), (0, 0)))

        # Row by row, in place: a [S1, V] pass over the whole state (12.8 + 3.2 MB for SmolLM2 at 64
        # seats) took ~3 ms on every step in which a sequence started.
        def init_seat(i, cm):
            counts, marks = cm
            seat, parent = rec.init_seats[i], rec.init_parents[i]
            V = counts.shape[1]
            counts = jax.lax.dynamic_update_slice(counts, jnp.zeros((1, V), counts.dtype), (seat, 0))
            inherited = jax.lax.dynamic_slice(marks, (jnp.maximum(parent, 0), 0), (1, V)) & (parent >= 0)
            return counts, jax.lax.dynamic_update_slice(marks, inherited, (seat, 0))

        counts, marks = jax.lax.fori_loop(0, rec.num_inits, init_seat, (state.output_counts, state.in_prompt))
        # Padding tokens carry an out-of-range seat and are dropped; so is the other kind of token.
        S1 = counts.shape[0]
        counts = counts.at[jnp.where(rec.token_is_output, rec.token_seats, S1), token_ids].add(1, mode="drop")
        marks = marks.at[jnp.where(rec.token_is_output, S1, rec.token_seats), token_ids].set(True, mode="drop")
        return hidden, kv_pages, PenaltyRows(counts, marks)

    def _sample_impl(self, params, hidden, state: PenaltyRows, x: SampleArrays):
        logits_indices, row_seats, tensors = x.logits_indices, x.row_seats, x.tensors
        model = nnx.merge(self.graphdef, params)
        # Vocab-parallel lm_head: logits come out split over the vocabulary; only the rows that sample
        # are gathered, and the sampler runs replicated.
        logits = jax.lax.with_sharding_constraint(model.compute_logits(hidden[logits_indices]), self.replicated)
        pen = PenaltyRows(state.output_counts, state.in_prompt, rows=row_seats)
        out = sample(logits, tensors, pen, num_top_logprobs=NUM_TOP_LOGPROBS)
        return out, jnp.pad(out.token_ids, (0, self.shapes.row_buckets[-1] - out.token_ids.shape[0]))

    def _pool_impl(self, hidden, segments):
        """Embeddings: per scheduled sequence, the sum of its selected (final-normed) hidden rows."""
        return jax.ops.segment_sum(hidden.astype(jnp.float32), segments, num_segments=self.max_seqs + 1)

    # ---- host side ----------------------------------------------------------------------------

    def prepare(self, sched: SchedulerOutput, prev_rows: dict[int, int] | None = None) -> StepInputs:
        """Flattens the scheduled sequences into one padded ragged batch. `prev_rows` maps id(seq) to
        the row of the in-flight step that sampled its still-unknown last token.

        Single-token (decode) rows go first, by context length, so that attention tiles hold rows of
        similar length; then prefill chunks. `row_offsets` stays in the scheduler's order.
        """
        items = sched.scheduled
        order = sorted(range(len(items)), key=lambda i: (items[i].num_tokens > 1, items[i].start))
        T = self.shapes.pick(self.shapes.token_buckets, sched.total_tokens, "tokens")
        S = min(T, self.max_seqs)
        token_ids = np.zeros(T, np.int32)
        from_prev = np.full(T, -1, np.int32)
        positions = np.zeros(T, np.int32)
        slots = np.full(T, -1, np.int32)
        token_seats = np.full(T, self.num_seats + 1, np.int32)
        token_is_output = np.zeros(T, bool)
        cu = np.zeros(S + 1, np.int32)
        kv_lens = np.zeros(S, np.int32)
        page_table = np.zeros((S, self.max_pages_per_seq), np.int32)
        offsets = [0] * len(items)
        row = 0
        for i, k in enumerate(order):
            item = items[k]
            seq, start, n = item.seq, item.start, item.num_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            pages = np.asarray(seq.pages, np.int32)
            known = seq.token_ids[start:start + n]
            token_ids[row:row + len(known)] = known
            if len(known) < n:  # the last token was sampled by the step still on the device
                from_prev[row + n - 1] = prev_rows[id(seq)]
            positions[row:row + n] = pos
            slots[row:row + n] = pages[pos // self.page_size] * self.page_size + pos % self.page_size
            token_seats[row:row + n] = seq.seat
            token_is_output[row:row + n] = pos >= seq.num_prompt_tokens
            page_table[i, :len(pages)] = pages
            kv_lens[i] = start + n
            offsets[k] = row
            row += n
            cu[i + 1] = row
        cu[len(items) + 1:] = row
        pool_segments = None
        if any(item.seq.request.pooling for item in items):
            pool_segments = np.full(self.shapes.token_buckets[-1], self.max_seqs, np.int32)
            for k, item in enumerate(items):
                pooling, end = item.seq.request.pooling, offsets[k] + item.num_tokens
                if pooling == "mean":
                    pool_segments[offsets[k]:end] = k
                elif pooling == "last" and item.start + item.num_tokens == item.seq.num_tokens:
                    pool_segments[end - 1] = k
        md = AttentionMetadata(slot_mapping=slots, kv_lens=kv_lens, page_table=page_table, cu_q_lens=cu,
                               num_seqs=np.array([len(items)], np.int32))
        record = self._record(token_seats, token_is_output, sched.seat_inits)
        return StepInputs(ForwardArrays(token_ids, from_prev, positions, md, record), offsets, pool_segments)

    def _record(self, token_seats, token_is_output, seat_inits: dict[int, int]) -> PenaltyRecord:
        S1 = self.num_seats + 1
        seats, parents = np.zeros(S1, np.int32), np.full(S1, RESET_SEAT, np.int32)
        inits = sorted(seat_inits.items(), key=lambda init: init[1] == RESET_SEAT)  # forks first
        for i, (seat, parent) in enumerate(inits):
            seats[i], parents[i] = seat, parent
        return PenaltyRecord(token_seats, token_is_output, seats, parents, np.asarray(len(inits), np.int32))

    def fetch(self, pending: PendingStep) -> SamplerOutput | None:
        """Waits for a dispatched step; device errors surface here."""
        if pending.out is None:
            jax.block_until_ready(pending.hidden)  # a forward-only step's faults show up here
            return None
        return jax.tree.map(lambda a: np.asarray(a)[:pending.num_rows], pending.out)

    def dispatch(self, inputs: StepInputs, rows: list[LogitsRow], prev: PendingStep | None = None) -> PendingStep:
        """Enqueues the step on the device and returns at once."""
        hidden = self._run_forward(inputs.forward, self.no_samples if prev is None else prev.sampled)
        pooled = None if inputs.pool_segments is None else self._run_pool(hidden, inputs.pool_segments)
        if not rows:
            return PendingStep(None, self.no_samples, 0, hidden, pooled)
        R = self.shapes.pick(self.shapes.row_buckets, len(rows), "logits rows")
        B = self.shapes.bias_slots[0 if all(not r.spec.bias for r in rows) else -1]
        tensors = SamplingTensors.build([r.spec for r in rows], R=R, B=B, W=self.mask_words)
        indices = np.zeros(R, np.int32)
        indices[:len(rows)] = [r.flat_row for r in rows]
        seats = np.full(R, self.num_seats, np.int32)
        seats[:len(rows)] = [self.num_seats if r.seat is None else r.seat for r in rows]
        out, sampled = self._run_sample(hidden, SampleArrays(indices, seats, tensors))
        return PendingStep(out, sampled, len(rows), hidden, pooled)

    def _track(self, signature: tuple) -> None:
        if signature in self.compiled:
            return
        self.compiled.add(signature)
        if self.warmed_up:
            self.num_recompiles += 1
            logger.warning("compiling %s after warm-up (recompile #%d): a shape outside the ShapeTable",
                           signature, self.num_recompiles)

    # The only entry points to the device: on many hosts `mirror` sends each call's plain arrays to
    # the other ranks first, so that every rank enqueues the same programs in the same order.

    def _run_forward(self, x: ForwardArrays, prev_sampled):
        self._track(("forward", len(x.token_ids)))
        if self.mirror is not None:
            self.mirror.forward(x, prev_sampled)
        with jax.set_mesh(self.mesh):
            hidden, self.kv_pages, self.penalty_state = self._forward(
                self.params, self.kv_pages, self.penalty_state, prev_sampled, x)
        return hidden

    def _run_sample(self, hidden, x: SampleArrays):
        self._track(("sample", len(x.logits_indices), x.tensors.bias_ids.shape[1]))
        if self.mirror is not None:
            self.mirror.sample(x)
        with jax.set_mesh(self.mesh):
            out, sampled = self._sample(self.params, hidden, self.penalty_state, x)
        if self.mirror is not None:
            self.mirror.sampled(sampled)
        return out, sampled

    def _run_pool(self, hidden, segments):
        self._track(("pool",))
        if self.mirror is not None:
            self.mirror.pool(segments)
        with jax.set_mesh(self.mesh):
            return self._pool(hidden, segments)

    # ---- warm-up ------------------------------------------------------------------------------

    def _padding_inputs(self, T: int) -> StepInputs:
        """A forward step of T padding tokens: writes nothing, records nothing."""
        S = min(T, self.max_seqs)
        md = AttentionMetadata(slot_mapping=np.full(T, -1, np.int32), kv_lens=np.zeros(S, np.int32),
                               page_table=np.zeros((S, self.max_pages_per_seq), np.int32),
                               cu_q_lens=np.zeros(S + 1, np.int32), num_seqs=np.zeros(1, np.int32))
        rec = self._record(np.full(T, self.num_seats + 1, np.int32), np.zeros(T, bool), {})
        return StepInputs(ForwardArrays(np.zeros(T, np.int32), np.full(T, -1, np.int32), np.zeros(T, np.int32), md,
                                        rec), [])

    def forward_hlo(self, T: int) -> str:
        """The compiled forward program for T tokens as HLO text (tests count its collectives)."""
        x = self._padding_inputs(T).forward
        with jax.set_mesh(self.mesh):
            return self._forward.lower(self.params, self.kv_pages, self.penalty_state, self.no_samples,
                                       x).compile().as_text()

    def warmup(self) -> float:
        """Compiles every program of the ShapeTable with all-padding inputs (they write nothing)."""
        t0 = time.perf_counter()
        scratch = self.num_seats
        hidden = None
        for _, T in (p for p in self.shapes.programs() if p[0] == "forward"):
            hidden = self._run_forward(self._padding_inputs(T).forward, self.no_samples)
        for _, R, B in (p for p in self.shapes.programs() if p[0] == "sample"):
            tensors = SamplingTensors.build([], R=R, B=B, W=self.mask_words)
            out = self._run_sample(hidden, SampleArrays(np.zeros(R, np.int32), np.full(R, scratch, np.int32), tensors))
            jax.block_until_ready(out)
        jax.block_until_ready(self._run_pool(hidden, np.full(self.shapes.token_buckets[-1], self.max_seqs, np.int32)))
        jax.block_until_ready(self.kv_pages)
        self.warmed_up = True
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

