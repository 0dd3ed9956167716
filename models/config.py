"""One dataclass describing a decoder-only transformer, whichever file format it came from."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture hyper-parameters of every decoder family (a family file only chooses values).

    rope_scaling: None, or a dict with "rope_type" in {"linear", "llama3", "freq_factors"} plus that
    type's fields (HF names: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings;
    "freq_factors" carries llama.cpp's per-frequency divisors as "factors"). With layer_types, it and
    rope_theta are the full-attention layers' rope; sliding layers use local_rope_theta (unscaled).
    layer_types: per layer "sliding_attention" (window = sliding_window) or "full_attention"; None
    means every layer has sliding_window (which may be None).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Family knobs (defaults: Llama).
    norm_offset: float = 0.0                    # RMSNorm scales by (offset + w): Gemma stores w - 1
    hidden_act: str = "silu"                    # gated MLP activation: silu | gelu_tanh
    attention_bias: bool = False                # q/k/v biases (Qwen2)
    qk_norm: bool = False                       # per-head RMSNorm of q and k before rope (Qwen3, Gemma 3)
    sandwich_norm: bool = False                 # norms after attention and MLP too (Gemma 2/3)
    embed_scale: bool = False                   # embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim)
    attn_logit_softcap: float | None = None     # cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None    # the same on the output logits (Gemma 2)
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None       # sliding layers' rope base (Gemma 3)
    # Mixture of experts (0 experts: dense). A layer is MoE unless listed in mlp_only_layers, and
    # then only every decoder_sparse_step-th layer (Qwen-MoE's rule; Mixtral: all layers).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True                 # renormalize the top-k router weights to sum 1
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    # How to run, not what: ragged attention implementation (see pallas_kernels.ragged_paged_attention).
    attention_backend: str = "auto"
    attention_interpret: bool = False
    expert_parallel: bool = False               # experts split over the mesh's "model" axis (models/sharding.py)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def __hash__(self):
        # rope_scaling is a dict; NNX graph definitions hash their static attributes (this config).
        def freeze(v):
            if isinstance(v, dict):
                return tuple(sorted((k, freeze(x)) for k, x in v.items()))
            return tuple(v) if isinstance(v, list) else v
        return hash(tuple(freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: attends to its whole context)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    def layer_is_moe(self) -> tuple[bool, ...]:
        return tuple(self.num_experts > 0 and i not in self.mlp_only_layers
                     and (i + 1) % self.decoder_sparse_step == 0 for i in range(self.num_layers))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def kv_pool_shape(self, num_pages: int, page_size: int) -> tuple[int, int, int, int, int]:
        """[num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim]: K/V interleaved along heads."""
        return (self.num_layers, num_pages, page_size, 2 * self.num_kv_heads, self.head_dim)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "TransformerConfig":
        """From a HF config.json dict (transformers 4.x `rope_scaling`/`rope_theta` or 5.x `rope_parameters`).
        The fields only some families have are set by their file (models/<family>.py, hf_config)."""
        archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if "full_attention" in rope:  # transformers 5: one rope per layer type (Gemma 3)
            rope = dict(rope["full_attention"])
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        eos = cfg.get("eos_token_id")
        types = cfg.get("layer_types")
        return cls(
            architecture=archs[0],
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            layer_types=tuple(types) if types and "sliding_attention" in types else None,
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], *, tied: bool,
                  freq_factors=None) -> "TransformerConfig":
        """From GGUF key/values (loading.gguf_file.GGUFFile.metadata).

        tied: whether the file lacks `output.weight` (the head then reuses `token_embd`).
        freq_factors: the `rope_freqs.weight` tensor, if the file has one ([head_dim // 2]).
        """
        arch = metadata["general.architecture"]

        def get(key, default=None):
            return metadata.get(f"{arch}.{key}", default)

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        vocab = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))
        if not vocab:
            raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        rope_scaling = None
        if freq_factors is not None:  # llama.cpp's form of llama3 scaling: a divisor per frequency
            rope_scaling = {"rope_type": "freq_factors", "factors": tuple(float(f) for f in freq_factors)}
        elif get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        head_dim = get("attention.key_length") or hidden // heads
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv") or heads),
            head_dim=int(head_dim),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings=tied,
            max_position_embeddings=int(get("context_length", 4096)),
            sliding_window=get("attention.sliding_window"),
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            num_experts=int(get("expert_count", 0)),
            num_experts_per_tok=int(get("expert_used_count", 0)),
            moe_intermediate_size=int(get("expert_feed_forward_length", 0) or 0),
        )

