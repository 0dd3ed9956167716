"""One batch job on one host: a reader thread streams and validates input lines ahead of the engine, the
main thread keeps the engine fed as capacity frees, and finished records are committed in parts.

The engine holds at most 2 x max_num_seqs requests (running + waiting) and the reader at most
max_num_seqs lines ahead, so host memory does not grow with the input; the scheduler always has a
full batch to pick from, never a fixed chunk to drain."""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from jaxllm.batch import storage
from jaxllm.batch.progress import JobDir, Resume
from jaxllm.batch.records import Record, Work, error_record, finished_record, key_of, parse_line
from jaxllm.batch.storage import Shard
from jaxllm.config import BatchConfig
from server.errors import APIError
from server.prepare import EngineLimits, _guess_param

logger = logging.getLogger("jaxllm.run_batch")


class DuplicateCustomIds(ValueError):
    pass


@dataclass
class Summary:
    requests: int = 0  # records written by this run (errors included)
    errors: int = 0
    resumed: int = 0  # lines found done in parts of earlier runs
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, rec: Record) -> None:
        self.requests += 1
        self.errors += not rec.ok
        self.prompt_tokens += rec.prompt_tokens
        self.completion_tokens += rec.completion_tokens

    def line(self) -> str:
        tps = self.completion_tokens / self.seconds if self.seconds else 0.0
        resumed = f", {self.resumed} done by earlier runs" if self.resumed else ""
        return (f"run_batch: {self.requests} requests ({self.errors} errors{resumed}), {self.prompt_tokens} prompt "
                f"+ {self.completion_tokens} output tokens in {self.seconds:.1f} s, {tps:.1f} output tok/s")


def iter_lines(shards: list[Shard]) -> Iterator[tuple[str, int, bytes]]:
    """(shard url, 1-based line number, raw line) of every non-blank line, shards in name order."""
    for shard in shards:
        for lineno, raw in enumerate(storage.read_lines(shard.url), 1):
            if raw.strip():
                yield shard.url, lineno, raw


def scan(shards: list[Shard]) -> int:
    """The pre-pass before any work: counts the lines (the progress bar's total) and rejects duplicate
    custom_ids, holding 8 bytes per line."""
    keys = array("Q")
    for url, lineno, raw in iter_lines(shards):
        keys.append(key_of(raw, url, lineno)[0])
    arr = np.sort(np.frombuffer(keys, dtype=np.uint64)) if keys else np.zeros(0, np.uint64)
    dup = arr[1:][arr[1:] == arr[:-1]]
    if len(dup):
        dup_keys = set(int(k) for k in dup[:1000])
        where: dict[int, list[str]] = {}
        for url, lineno, raw in iter_lines(shards):
            key, cid = key_of(raw, url, lineno)
            if key in dup_keys:
                where.setdefault(key, []).append(f"{cid!r} at {url}:{lineno}")
        shown = "; ".join(", ".join(v) for v in list(where.values())[:5])
        raise DuplicateCustomIds(f"{len(dup)} duplicate custom_id(s) in the input, nothing was run: {shown}")
    return len(keys)


class BatchJob:
    def __init__(self, engine, job: JobDir, resume: Resume, shards: list[Shard], total: int, config: BatchConfig,
                 lines: Iterable[tuple[str, int, bytes]] | None = None):
        """lines: (source, line number, raw line) to run instead of the shards' (Ray workers pass theirs)."""
        self.engine = engine
        self.lines = lines
        self.job = job
        self.resume = resume
        self.shards = shards
        self.total = total
        self.config = config
        self.limits = EngineLimits(tokenizer=engine.tokenizer, max_model_len=int(engine.max_model_len),
                                   model_names=[engine.model_name], make_params=_sampling_params,
                                   grammars=getattr(engine, "grammars", None))
        self.max_seqs = engine.config.scheduler.max_num_seqs
        self.summary = Summary(resumed=len(resume.done))
        self._stop = threading.Event()
        self._stop_signal: int | None = None

    # ---- reader thread: input lines -> Work / error Record, lines done by earlier runs skipped

    def _read(self, out: queue.Queue) -> None:
        try:
            for url, lineno, raw in (self.lines if self.lines is not None else iter_lines(self.shards)):
                if self._stop.is_set():
                    return
                key, _ = key_of(raw, url, lineno)
                if self.resume.is_done(key):
                    continue
                out.put(parse_line(raw, url, lineno, self.limits))
            out.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            out.put(exc)

    # ---- main thread

    def run(self) -> Summary:
        t0 = time.perf_counter()
        lines: queue.Queue = queue.Queue(maxsize=self.max_seqs)
        reader = threading.Thread(target=self._read, args=(lines,), name="jaxllm-batch-reader", daemon=True)
        reader.start()
        # Signal handlers exist only in the main thread (a Ray actor runs us elsewhere).
        old = ({s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
               if threading.current_thread() is threading.main_thread() else {})
        engine = self.engine
        inflight: dict[str, tuple[Work, int]] = {}
        buffer: list[Record] = []
        seq = self.resume.next_part
        last_commit = time.monotonic()
        reader_done = False
        bar = tqdm(total=self.total, initial=len(self.resume.done), desc="run_batch", unit="req",
                   disable=not self.config.progress, dynamic_ncols=True, mininterval=1.0)
        last_postfix = 0.0

        def finish(rec: Record) -> None:
            nonlocal last_postfix
            buffer.append(rec)
            self.summary.add(rec)
            bar.update(1)
            now = time.perf_counter()
            if now - last_postfix > 1.0:
                last_postfix = now
                bar.set_postfix_str(f"{self.summary.completion_tokens / (now - t0):.1f} tok/s", refresh=False)

        try:
            while not self._stop.is_set():
                # Top up the engine: it runs every step with as many requests as fit. (A run of bad lines
                # stops at a full buffer too, so that it is committed.)
                while (not reader_done and len(engine.requests) < 2 * self.max_seqs
                       and len(buffer) < self.config.commit_records):
                    try:
                        item = lines.get(block=not engine.has_unfinished_requests())
                    except queue.Empty:
                        break
                    if item is None:
                        reader_done = True
                    elif isinstance(item, BaseException):
                        raise item
                    elif isinstance(item, Record):
                        finish(item)
                    else:
                        rec = self._add(item, inflight)
                        if rec is not None:
                            finish(rec)
                if engine.has_unfinished_requests():
                    for out in engine.step():
                        if not out.finished or out.request_id not in inflight:
                            continue
                        work, i = inflight.pop(out.request_id)
                        work.finals[i] = out
                        if len(work.finals) == len(work.prepared.prompts):
                            finish(finished_record(work, engine.tokenizer))
                elif reader_done:
                    break
                if buffer and (len(buffer) >= self.config.commit_records
                               or time.monotonic() - last_commit >= self.config.commit_seconds):
                    self.job.commit(seq, buffer)
                    seq, buffer, last_commit = seq + 1, [], time.monotonic()
            if buffer:  # done, or stopped by SIGTERM / SIGINT: what is finished is kept
                self.job.commit(seq, buffer)
        finally:
            self._stop.set()
            bar.close()
            for s, handler in old.items():
                signal.signal(s, handler)
            if inflight:
                engine.abort_request(list(inflight))
        self.summary.seconds = time.perf_counter() - t0
        if self._stop_signal is not None:
            raise KeyboardInterrupt(f"stopped by {signal.Signals(self._stop_signal).name}; finished records "
                                    f"were committed, re-run the same command to resume")
        return self.summary

    def _add(self, work: Work, inflight: dict[str, tuple[Work, int]]) -> Record | None:
        added = []
        try:
            for i, (rid, (text, ids), params) in enumerate(zip(work.request_ids, work.prepared.prompts,
                                                               work.prepared.params)):
                self.engine.add_request(rid, text, params, prompt_token_ids=ids, priority=work.prepared.priority,
                                        cache_salt=work.prepared.cache_salt)
                added.append(rid)
                inflight[rid] = (work, i)
        except ValueError as exc:  # the engine's own checks, answered as the server answers them
            self.engine.abort_request(added)
            for rid in added:
                inflight.pop(rid, None)
            msg = str(exc)
            param = "prompt" if "prompt" in msg or "token" in msg else _guess_param(msg, "max_tokens")
            return error_record(work.key, work.custom_id, APIError(msg, 400, param=param))
        return None

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        self._stop.set()


def _sampling_params(**kw):
    from jaxllm.sampling_params import SamplingParams
    return SamplingParams(**kw)
