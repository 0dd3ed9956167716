"""Flax NNX model families and their weight loading. Entry point: load_model."""

from models.base import AttentionMetadata, CausalLM
from models.config import TransformerConfig
from models.llama import LlamaForCausalLM
from models.transformer import DecoderLM
from models.loading.errors import CheckpointError, CheckpointNotFoundError
from models.registry import LoadedModel, default_model_path, load_model

__all__ = ["AttentionMetadata", "CausalLM", "CheckpointError", "CheckpointNotFoundError", "DecoderLM", "LlamaForCausalLM",
           "LoadedModel", "TransformerConfig", "default_model_path", "load_model"]
