"""The batch job on many hosts with Ray Data (extra `ray`): the same input lines, validation, engine loop and
output records as `python -m jaxllm.run_batch`, with Ray spreading blocks of lines over one engine actor
per host / accelerator.

    from jaxllm.batch.ray import run_batch
    run_batch("gs://bucket/data/*.jsonl", "gs://bucket/results/", num_engines=8,
              engine_flags={"max_num_seqs": 256}, resources_per_engine={"TPU": 4})

The output is a directory of JSONL files (one per write task) whose lines are the OpenAI batch records.

What it guarantees: Ray Data retries a failed task (a lost actor, a preempted worker) and a write task
writes its file whole under a name fixed by the dataset and task index, so a run that completes holds
every line exactly once. It does not resume a driver that died: the re-run starts over and overwrites the
output directory (SaveMode.OVERWRITE), redoing everything, never duplicating. For resume-after-kill on
one host use `python -m jaxllm.run_batch`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import ray
import ray.data
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink

from jaxllm.batch.job import BatchJob
from jaxllm.batch.progress import Resume
from jaxllm.batch.records import Record
from jaxllm.config import BatchConfig, EngineConfig


class _Collect:
    """The JobDir stand-in of a worker: its records go back to Ray Data, which writes them."""

    def __init__(self):
        self.records: list[Record] = []

    def commit(self, seq: int, records: list[Record]) -> None:
        self.records.extend(records)


class EngineWorker:
    """One LLMEngine per actor, built once; each call runs a block of input lines to output lines."""

    def __init__(self, model: str | None, engine_flags: dict[str, Any]):
        from jaxllm.engine.data_parallel import size_cpu_threads
        from jaxllm.engine.engine import LLMEngine
        config = EngineConfig.from_flags(model=model, **engine_flags)
        size_cpu_threads(config)  # as create_engine does
        self.engine = LLMEngine(config)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        # Ray's text reader keeps the source path, not line numbers: a line without a custom_id is keyed
        # by its path and content instead.
        lines = [(str(path), int(hashlib.blake2b(text.encode(), digest_size=6).hexdigest(), 16), text.encode())
                 for path, text in zip(batch["path"], batch["text"])]
        sink = _Collect()
        config = BatchConfig(progress=False, commit_records=1 << 62, commit_seconds=float("inf"))
        BatchJob(self.engine, sink, Resume.fresh(), [], len(lines), config, lines=lines).run()
        return {"line": [r.line.decode() for r in sink.records]}


class _JsonLines(BlockBasedFileDatasink):
    def __init__(self, path: str):
        from ray.data import SaveMode
        super().__init__(path, file_format="jsonl", mode=SaveMode.OVERWRITE)

    def write_block_to_file(self, block: BlockAccessor, file) -> None:
        for line in block.to_pandas()["line"]:
            file.write(line.encode())


def run_batch(input_paths: str | list[str], output_dir: str, *, model: str | None = None,
              engine_flags: dict[str, Any] | None = None, num_engines: int = 1, lines_per_call: int = 256,
              resources_per_engine: dict[str, float] | None = None) -> None:
    """Reads OpenAI batch JSONL (paths, globs, gs:// URLs), writes the records as JSONL files in output_dir."""
    ds = ray.data.read_text(input_paths, include_paths=True, drop_empty_lines=True)
    resources = dict(resources_per_engine or {"CPU": 1})
    ds = ds.map_batches(EngineWorker, fn_constructor_kwargs={"model": model, "engine_flags": engine_flags or {}},
                        batch_size=lines_per_call, concurrency=num_engines, num_cpus=resources.pop("CPU", 0),
                        num_gpus=resources.pop("GPU", 0), resources=resources or None)
    ds.write_datasink(_JsonLines(output_dir))
