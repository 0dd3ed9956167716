"""Exactly-once output on object-store semantics: immutable, whole-object writes only.

The job's work dir (default OUTPUT + ".jaxllm-job/") holds
  job.json          the progress record: which input (shard URLs + sizes) the parts belong to, and
                    whether the final output was assembled;
  part-NNNNNN.jsonl committed output parts, each written once, whole (see storage.write_atomic).

A record is done once the part holding it exists; nothing else says so. On start the job reads the keys
of every committed part (8 bytes per done line in a sorted numpy array) and skips those lines, so a kill
at any point loses only records not yet in a part, and a record can never be in two parts: a part is
either entirely there or not at all, and a line whose key is in a part is never run again. When every
line is done the parts are concatenated into OUTPUT (itself one whole-object write), job.json is
rewritten with completed=true, and the parts are deleted. A kill between those steps is harmless: the
next run sees completed=true (skip) or the parts still there (assemble again).

Redone work after a kill: the records finished since the last commit (at most --commit-records, or
--commit-seconds of work) plus the requests the engine held (at most 2 x max_num_seqs, partly generated).
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass

import numpy as np

from jaxllm.batch import storage
from jaxllm.batch.faults import crash_point
from jaxllm.batch.records import Record, key_of_output
from jaxllm.batch.storage import Shard, StorageError

_FORMAT = 1
_PART = "part-"


@dataclass
class Resume:
    done: np.ndarray  # sorted uint64 keys of the lines already in committed parts
    next_part: int
    completed: bool  # the output was assembled by an earlier run

    @classmethod
    def fresh(cls) -> "Resume":
        return cls(np.zeros(0, np.uint64), 0, completed=False)

    def is_done(self, key: int) -> bool:
        i = np.searchsorted(self.done, np.uint64(key))
        return bool(i < len(self.done) and self.done[i] == key)


class JobDir:
    def __init__(self, work_dir: str, output: str, shards: list[Shard], total_lines: int, model: str = ""):
        self.url = work_dir
        self.output = output
        # What must not change between a run and its resume: the input, where it goes, the model answering.
        self.record = {"format": _FORMAT, "input": [[s.url, s.size] for s in shards], "output": output,
                       "model": model, "lines": total_lines, "completed": False}

    def open(self) -> Resume:
        """Checks that the work dir belongs to this job (or starts it) and reads what is done. Writing
        job.json first is also the check that OUTPUT's location is writable, before any model loads."""
        job_url = storage.join(self.url, "job.json")
        try:
            raw = storage.read_bytes(job_url)
        except OSError as exc:
            raise StorageError(f"cannot read the job's progress record {job_url}: {exc}") from None
        if raw is not None:
            old = json.loads(raw)
            changed = [k for k in ("input", "output", "model") if old.get(k) != self.record[k]]
            if changed:
                raise StorageError(f"{self.url} holds the progress of another job (its {', '.join(changed)} "
                                   f"differ); remove it or pass another --work-dir")
            if old.get("completed") and self._output_exists():
                return Resume(np.zeros(0, np.uint64), 0, completed=True)
        try:
            storage.make_dirs(self.url)
            storage.write_atomic(job_url, self._json(completed=False))
        except OSError as exc:
            raise StorageError(f"cannot write output {self.output} (work dir {self.url}): {exc}") from None
        keys = array("Q")
        parts = self.parts()
        for name in parts:
            for line in storage.read_lines(storage.join(self.url, name)):
                if line.strip():
                    keys.append(key_of_output(line))
        done = np.sort(np.frombuffer(keys, dtype=np.uint64)) if keys else np.zeros(0, np.uint64)
        next_part = int(parts[-1][len(_PART):].split(".")[0]) + 1 if parts else 0
        return Resume(done, next_part, completed=False)

    def parts(self) -> list[str]:
        return storage.list_dir(self.url, _PART)

    def commit(self, seq: int, records: list[Record]) -> None:
        name = f"{_PART}{seq:06d}.jsonl"
        storage.write_atomic(storage.join(self.url, name), b"".join(r.line for r in records), fault=f"{name}:mid")
        crash_point(f"{name}:after")

    def assemble(self) -> None:
        parts = self.parts()
        chunks = (c for name in parts for c in storage.iter_chunks(storage.join(self.url, name)))
        storage.write_stream(self.output, chunks, fault="assemble:mid")
        crash_point("assemble:after")
        storage.write_atomic(storage.join(self.url, "job.json"), self._json(completed=True))
        for i, name in enumerate(parts):
            storage.remove(storage.join(self.url, name))
            if i == 0:
                crash_point("cleanup:mid")

    def _output_exists(self) -> bool:
        try:
            storage.list_shards(self.output)
            return True
        except StorageError:
            return False

    def _json(self, completed: bool) -> bytes:
        return json.dumps({**self.record, "completed": completed}, indent=1).encode()
