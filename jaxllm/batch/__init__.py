"""Batch jobs: `python -m jaxllm.run_batch` on one host (job.py: the engine loop; progress.py: exactly-once
parts + progress record; records.py: OpenAI batch lines in and out; storage.py: fsspec files) and
`jaxllm.batch.ray` over many hosts (extra `ray`)."""
