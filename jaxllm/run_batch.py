"""`python -m jaxllm.run_batch -i INPUT -o OUTPUT [engine flags]` (also `jaxllm run-batch`): an OpenAI batch
file through one engine, resumable and exactly once.

INPUT: OpenAI batch JSONL (`{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body"}` per line), a local path or any fsspec URL (gs://bucket/data/*.jsonl: a glob of
shards, read in name order; .gz shards decompressed), streamed. OUTPUT: OpenAI batch output JSONL
(`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`), one line per input
line, in completion order (match lines by custom_id, as with OpenAI's batch API). Bodies are what the
server answers: request validation and response building are the server's own functions
(server/prepare.py, server/responses.py), which is why this module, like jaxllm.serve, imports `server`.
A line the server would refuse gets its error record (the server's status and error body) and the job
goes on; duplicate custom_ids stop the job before any work.

Kill it at any point (kill -9, a preempted VM) and run the same command again: it resumes, and OUTPUT
has every custom_id exactly once. The redo after a kill is bounded by the records finished since the
last committed part (--commit-records / --commit-seconds) plus the <= 2 x max_num_seqs requests the
engine held. SIGTERM / SIGINT commit what is finished before exiting. jaxllm/batch/progress.py has the
design.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxllm.config import BatchConfig, add_dataclass_args, add_engine_args, config_from_args

logger = logging.getLogger("jaxllm.run_batch")

_HELP = {
    "input_file": "OpenAI batch JSONL: a path or fsspec URL (gs://...), globs of shards allowed",
    "output_file": "where the OpenAI batch output JSONL goes: a path or fsspec URL",
    "work_dir": "committed parts + progress record (default OUTPUT.jaxllm-job); keep it to resume",
    "commit_records": "commit an output part every this many finished records (the redo bound after a kill)",
    "commit_seconds": "... or every this many seconds, whichever comes first",
    "progress": "tqdm progress bar on stderr",
}


def build_parser(prog: str = "python -m jaxllm.run_batch") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="OpenAI batch file through jaxllm (resumable, exactly "
                                                            "once); engine flags as in `jaxllm serve`")
    parser.add_argument("model", nargs="?", default=None,
                        help="HF model dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    add_dataclass_args(parser, BatchConfig, short={"input_file": "-i", "output_file": "-o"}, help=_HELP)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_engine_args(parser)
    return parser


def batch_config(args: argparse.Namespace) -> BatchConfig:
    import dataclasses
    return BatchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BatchConfig)})


def main(argv: list[str] | None = None, *, engine=None) -> int:
    """Exit codes: 0 done (bad lines included), 2 unusable input / output / duplicate custom_ids, 1 engine
    failure, 130 stopped by a signal (resumable). Tests may pass a built `engine`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = batch_config(args)
    engine_config = config_from_args(args, args.model)
    if engine_config.parallel.follows_rank0:
        from jaxllm.engine.multihost import run_follower
        return run_follower(engine_config)  # rank 0 reads and writes the files
    from jaxllm.batch.job import BatchJob, DuplicateCustomIds, scan
    from jaxllm.batch.progress import JobDir
    from jaxllm.batch.storage import StorageError, list_shards

    # Everything that can be wrong with the paths fails here, before minutes of model loading.
    try:
        shards = list_shards(config.input_file)
        total = scan(shards)
        model = args.model or args.model_flag or (getattr(engine.config.model, "model", None) if engine else None)
        job = JobDir(config.work_dir or config.output_file.rstrip("/") + ".jaxllm-job", config.output_file,
                     shards, total, model=f"{model or 'default'} {args.served_model_name or ''}".strip())
        resume = job.open()
    except (StorageError, DuplicateCustomIds) as exc:
        print(f"run_batch: error: {exc}", file=sys.stderr)
        return 2
    if resume.completed:
        print(f"run_batch: {config.output_file} is already complete ({total} requests); nothing to do")
        return 0
    if engine is None:
        from jaxllm.engine.data_parallel import create_engine
        engine = create_engine(engine_config)
    try:
        summary = BatchJob(engine, job, resume, shards, total, config).run()
    except KeyboardInterrupt as exc:
        print(f"run_batch: {exc}", file=sys.stderr)
        return 130
    job.assemble()
    print(f"{summary.line()}; output {config.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
