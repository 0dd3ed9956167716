"""Hugging Face Hub ids ("org/name") -> a local snapshot directory. Needs network access."""

from __future__ import annotations

import os
import re

from models.loading.errors import CheckpointNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not os.path.isabs(source) and not source.startswith(".")


def download(repo_id: str, *, revision: str | None = None) -> str:
    """Snapshot of the repo's config, tokenizer and weights (safetensors or GGUF), not .bin/.pth."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.gguf", "tokenizer*", "*.model",
                                                 "*.jinja", "*.txt"])
    except Exception as e:
        raise CheckpointNotFoundError(f"could not fetch {repo_id!r} from the Hugging Face Hub: {e}") from e
