"""Hugging Face Hub ids -> local paths. Needs network access (not exercised by the tests).

"org/name"                 -> snapshot of config, tokenizer and safetensors (never .bin/.pth)
"org/name/file.gguf"       -> that one GGUF file (GGUF repos hold many quantizations)
"""

from __future__ import annotations

import os
import re

from models.loading.errors import CheckpointNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-/]+\.gguf)?$")


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not os.path.isabs(source) and not source.startswith(".")


def download(source: str, *, revision: str | None = None) -> str:
    try:
        import huggingface_hub as hub
        parts = source.split("/")
        if source.endswith(".gguf"):
            return hub.hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision)
        return hub.snapshot_download(source, revision=revision,
                                     allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                     "*.jinja", "*.txt"])
    except Exception as e:
        raise CheckpointNotFoundError(f"{source!r} is not a local file or directory, and fetching it from "
                                      f"the Hugging Face Hub failed: {e}") from e
