"""Batch jobs: `python -m jaxllm.run_batch` on one host (job.py, progress.py, records.py, storage.py)."""
