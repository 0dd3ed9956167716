"""Tokenizers for jaxllm: HF model dirs and GGUF files, chat templates, incremental detokenization.

Everything is a `tokenizers.Tokenizer` underneath (the Rust HF library): for a GGUF we rebuild it from
the vocabulary llama.cpp stored in the metadata, so loading takes well under a second and never goes
through transformers' slow Python conversion. transformers stays the *test oracle*.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# GGUF metadata (header only). gguf.GGUFReader parses every tensor's info and each array element as a
# separate numpy "part" (~2 s for a 49k vocab); we only need the key/value header, read straight from
# an mmap in ~50 ms.
# --------------------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as Python values (arrays of numbers as np.ndarray)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        # Big-endian files exist (s390x); the version field tells them apart.
        endian = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
        version = struct.unpack_from(endian + "I", buf, 4)[0]
        count_fmt = endian + ("I" if version == 1 else "Q")
        csize = struct.calcsize(count_fmt)
        pos = 8 + csize  # skip tensor count
        (n_kv,) = struct.unpack_from(count_fmt, buf, pos)
        pos += csize

        def read_str(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from(count_fmt, buf, p)
            p += csize
            # errors="replace": some converters wrote invalid UTF-8 into token strings.
            return bytes(buf[p : p + n]).decode("utf-8", errors="replace"), p + n

        def read_value(vtype: int, p: int) -> tuple[Any, int]:
            if vtype == _GGUF_STRING:
                return read_str(p)
            if vtype in _GGUF_SCALARS:
                fmt = endian + _GGUF_SCALARS[vtype]
                return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)
            if vtype == _GGUF_ARRAY:
                (itype,) = struct.unpack_from(endian + "I", buf, p)
                (n,) = struct.unpack_from(count_fmt, buf, p + 4)
                p += 4 + csize
                if itype in _GGUF_SCALARS:
                    dt = np.dtype(endian + _GGUF_SCALARS[itype])
                    arr = np.frombuffer(buf, dtype=dt, count=n, offset=p).copy()
                    return arr, p + n * dt.itemsize
                out = []
                for _ in range(n):
                    v, p = read_value(itype, p)
                    out.append(v)
                return out, p
            raise ValueError(f"unknown GGUF value type {vtype} in {path}")

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = read_str(pos)
            (vtype,) = struct.unpack_from(endian + "I", buf, pos)
            meta[key], pos = read_value(vtype, pos + 4)
        return meta


def _metadata_from_reader(reader: Any) -> dict[str, Any]:
    """Metadata dict from an already-open gguf.GGUFReader (avoids reading the file twice)."""
    return {name: field.contents() for name, field in reader.fields.items()}


# --------------------------------------------------------------------------------------------------
# Pre-tokenizers by `tokenizer.ggml.pre`. The string names the *original* tokenizer's split rules
# (llama.cpp's table). transformers' GGUF conversion only knows some of them and falls back to plain
# GPT-2 splitting for the rest -- e.g. "smollm"/"starcoder", whose real tokenizer.json splits every
# digit first, so "    1" gives [ĠĠĠĠ, 1] there but [ĠĠĠ, Ġ, 1] in transformers. We default to the
# model's real rules; `hf_gguf_compat=True` reproduces transformers' ids exactly.
# --------------------------------------------------------------------------------------------------

_CONTRACTIONS_CI = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = (
    _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+@C@"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*@C@"
)
_TEKKEN_SPLIT = _CASED_WORDS.replace("@C@", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O_SPLIT = (
    _CASED_WORDS.replace("@C@", _CONTRACTIONS_CI + "?") + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"

# Pre types transformers handles itself (same regexes): both modes agree on these.
_SPLITS_SHARED = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "kormo"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2", "kanana2"], _GPT4O_SPLIT),
}
# Pre types transformers gets wrong (plain GPT-2 split); only used when hf_gguf_compat=False.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_SPLITS_EXTRA = {**dict.fromkeys(["bloom", "poro-chat", "gpt3-finnish"], _BLOOM_SPLIT)}
# llama.cpp (and Llama 3's tokenizer.json) look a whole pre-token up in the vocab before merging.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}


def _byte_level_pre_tokenizer(pre: str | None, hf_gguf_compat: bool) -> pre_tokenizers.PreTokenizer:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = _SPLITS_SHARED.get(pre or "")
    if split is None and not hf_gguf_compat:
        if pre in _DIGITS_THEN_GPT2:
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
        split = _SPLITS_EXTRA.get(pre or "")
    if split is None:
        if pre not in {None, "default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"} | _DIGITS_THEN_GPT2:
            logger.warning("GGUF pre-tokenizer %r unknown; splitting like GPT-2", pre)
        return gpt2
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _build_gpt2_gguf(meta: Mapping[str, Any], hf_gguf_compat: bool) -> tuple[HFTokenizer, list[str]]:
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    # A token outside the byte alphabet (a few converters store raw text) is respelled so BPE can reach it.
    spelled = [t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre")
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=(not hf_gguf_compat and pre in _IGNORE_MERGES))
    )
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre, hf_gguf_compat)
    tok.decoder = decoders.ByteLevel()
    return tok, spelled


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two known tokens,
    best (highest-scoring) result first; on ties the longer left piece first (transformers' order)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    cands: list[tuple[float, int, int, str, str]] = []
    for tok, score in zip(tokens, scores):
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                cands.append((-float(score), -len(left), -len(right), left, right))
    cands.sort(key=lambda c: c[:3])  # stable: token order breaks remaining ties
    return [(c[3], c[4]) for c in cands]


def _build_spm_gguf(meta: Mapping[str, Any], hf_gguf_compat: bool) -> tuple[HFTokenizer, list[str]]:
    """SentencePiece-BPE vocabulary (tokenizer.ggml.model == "llama") as an HF BPE with byte fallback."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    scores = [0.0] * n if scores is None else list(scores)
    arch = meta.get("general.architecture", "")
    if arch.startswith("gemma"):
        # Gemma stores its whitespace-run tokens as real spaces, the rest of the vocab uses "▁"; its
        # scores do not follow merge order either -- file order does.
        tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores = [-float(i) for i in range(n)]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_scores(tokens, scores)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < n else None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not arch.startswith("gemma")))
    if hf_gguf_compat:
        # transformers: Metaspace, which prepends "▁" only to the very start, and only if no space is there.
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
        )
    else:
        # sentencepiece / llama.cpp: a space before every text fragment (also one already starting with a
        # space, and after each special token), then spaces -> "▁". The normalizer runs per fragment
        # between added tokens, which is exactly llama.cpp's "prefix if the previous piece was special".
        steps = [normalizers.Prepend("▁")] if add_prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, tokens


def _gguf_chat_template(meta: Mapping[str, Any]) -> str | dict[str, str] | None:
    default = meta.get("tokenizer.chat_template")
    named = {k[len("tokenizer.chat_template.") :]: v for k, v in meta.items() if k.startswith("tokenizer.chat_template.")}
    if not named:
        return default
    if default is not None:
        named["default"] = default
    return named


def _load_gguf(path: str, meta: Mapping[str, Any], hf_gguf_compat: bool) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tok, spelled = _build_gpt2_gguf(meta, hf_gguf_compat)
    elif model == "llama":
        tok, spelled = _build_spm_gguf(meta, hf_gguf_compat)
    else:
        raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported (gpt2 and llama are)")
    tokens = spelled
    types = meta.get("tokenizer.ggml.token_type")
    types = [_NORMAL] * len(tokens) if types is None else [int(t) for t in types]

    def ident(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos, eos = ident("bos_token_id"), ident("eos_token_id")
    unk, pad = ident("unknown_token_id"), ident("padding_token_id")
    # Control / unknown tokens are special (skipped when decoding); user-defined ones (e.g. <think>) are
    # matched whole in text but decoded. In a byte-level vocab a control token outside the alphabet is a
    # converter mislabel: adding it would grow the vocab past the model's, so it stays a plain token.
    byte_level = model == "gpt2"
    chars = set(_byte_alphabet().values())
    orig = list(meta["tokenizer.ggml.tokens"])
    named = {i for i in (bos, eos, unk, pad) if i is not None}
    special_ids = [
        i
        for i, t in enumerate(types)
        if (t == _CONTROL or (t == _UNKNOWN and not byte_level) or i in named)
        and (not byte_level or set(orig[i]) <= chars)
    ]
    user_ids = [i for i, t in enumerate(types) if t == _USER_DEFINED and i not in special_ids and orig[i] == tokens[i]]
    if special_ids:
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
    if user_ids:
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_ids])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos_tok, eos_tok = (tokens[i] if i is not None else None for i in (bos, eos))
    _set_bos_eos_post_processor(tok, bos_tok, eos_tok, add_bos, add_eos)

    eos_ids = {i for i in (eos, ident("eot_token_id"), ident("eom_token_id")) if i is not None}
    return Tokenizer(
        tok,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        primary_eos_token_id=eos,
        pad_token_id=pad,
        unk_token_id=unk,
        chat_template=_gguf_chat_template(meta),
        add_bos_token=add_bos,
        name_or_path=path,
    )


def _set_bos_eos_post_processor(
    tok: HFTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> None:
    # encode(add_special_tokens=True) adds exactly what this says -- the same TemplateProcessing transformers builds.
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(specials))
    )


# --------------------------------------------------------------------------------------------------
# HF model directories
# --------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _hf_chat_template(model_dir: str, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    # Newer checkpoints keep it in chat_template.jinja (or chat_template.json); older in tokenizer_config.
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or _read_json(os.path.join(model_dir, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        return {t["name"]: t["template"] for t in template}
    return template


def _load_hf_dir(model_dir: str) -> Tokenizer:
    config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    tok_json = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        tok = HFTokenizer.from_file(tok_json)
    else:
        # Only a sentencepiece tokenizer.model (or a slow vocab): let transformers convert it once.
        from transformers import AutoTokenizer

        tok = HFTokenizer.from_str(AutoTokenizer.from_pretrained(model_dir).backend_tokenizer.to_str())
    names = {k: _token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    # Named special tokens the tokenizer.json lacks get added (as transformers does).
    missing = [t for t in names.values() if t is not None and tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])
    ids = {k: (tok.token_to_id(v) if v is not None else None) for k, v in names.items()}
    # transformers (5.x) lets tokenizer.json's post-processor alone decide what encode() adds -- it ignores
    # tokenizer_config's add_bos_token for fast tokenizers -- so we do too, and just record what it does.
    bos_id = ids["bos_token"]
    add_bos = bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    # The model may stop on several ids (e.g. Llama 3 instruct: <|eot_id|> too); they live in these files.
    eos_ids = set(_ids(ids["eos_token"]))
    for extra in ("generation_config.json", "config.json"):
        eos_ids |= set(_ids(_read_json(os.path.join(model_dir, extra)).get("eos_token_id")))
    return Tokenizer(
        tok,
        bos_token_id=ids["bos_token"],
        eos_token_ids=eos_ids,
        primary_eos_token_id=ids["eos_token"] if ids["eos_token"] is not None else min(eos_ids, default=None),
        pad_token_id=ids["pad_token"],
        unk_token_id=ids["unk_token"],
        chat_template=_hf_chat_template(model_dir, config),
        add_bos_token=add_bos,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        name_or_path=model_dir,
    )


def load_tokenizer(
    source: str,
    *,
    gguf_reader: Any = None,
    gguf_metadata: Mapping[str, Any] | None = None,
    hf_gguf_compat: bool = False,
) -> Tokenizer:
    """Tokenizer of an HF model dir (tokenizer.json, or tokenizer.model via transformers) or a .gguf file.

    For a GGUF, pass `gguf_reader` (an open gguf.GGUFReader) or `gguf_metadata` (read_gguf_metadata's
    dict) if you already have one, to avoid reading the header twice. `hf_gguf_compat=True` reproduces
    transformers' GGUF conversion exactly, including its wrong pre-tokenizer for some `tokenizer.ggml.pre`.
    """
    source = os.fspath(source)
    if gguf_reader is not None or gguf_metadata is not None or source.endswith(".gguf"):
        if gguf_metadata is None:
            gguf_metadata = _metadata_from_reader(gguf_reader) if gguf_reader is not None else read_gguf_metadata(source)
        return _load_gguf(source, gguf_metadata, hf_gguf_compat)
    if os.path.isdir(source):
        return _load_hf_dir(source)
    if os.path.isfile(source) and source.endswith(".json"):  # a bare tokenizer.json
        return _load_hf_dir(os.path.dirname(source) or ".")
    # A hub id: resolve to a local snapshot (works offline from the cache).
    from huggingface_hub import snapshot_download

    return _load_hf_dir(
        snapshot_download(source, allow_patterns=["*.json", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"])
    )


# --------------------------------------------------------------------------------------------------
# Chat templates: rendered like transformers' apply_chat_template(tokenize=False).
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # trim_blocks/lstrip_blocks: every HF template is written for these settings.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# A template that walks `content` as a list of parts (OpenAI format) -- otherwise parts are flattened.
_OPENAI_CONTENT_RE = re.compile(
    r"""(?:\[['"]content['"]\]|\.content)\s+is\s+(?:not\s+)?(?:string|iterable|sequence|mapping)"""
    r"""|for\s+\w+\s+in\s+\w+(?:\[['"]content['"]\]|\.content)"""
)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _flatten_content(content: Any) -> Any:
    if isinstance(content, (list, tuple)):
        texts = (p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text")
        return "\n".join(texts)
    return content


def _prepare_messages(messages: Iterable[Mapping[str, Any]], flatten: bool) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        # Drop None values (OpenAI sends content=None with tool_calls); templates test key presence.
        msg = {k: v for k, v in dict(m).items() if v is not None}
        if flatten and "content" in msg:
            msg["content"] = _flatten_content(msg["content"])
        if "tool_calls" in msg:  # OpenAI gives arguments as a JSON string; templates index them as a dict
            calls = []
            for call in msg["tool_calls"]:
                call = dict(call)
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                call["function"] = fn
                calls.append(call)
            msg["tool_calls"] = calls
        out.append(msg)
    return out


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model-level facts the engine needs (special ids, chat template)."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        primary_eos_token_id: int | None,
        pad_token_id: int | None,
        unk_token_id: int | None,
        chat_template: str | dict[str, str] | None,
        add_bos_token: bool,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = primary_eos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids)
        if primary_eos_token_id is not None:
            self.eos_token_ids.add(primary_eos_token_id)
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        # SentencePiece-style decoders turn "▁" into a space (and strip it at the start of the text).
        decoder_state = repr(backend.decoder) if backend.decoder is not None else ""
        self._is_spm = "Metaspace" in decoder_state or "\u2581" in decoder_state
        added = backend.get_added_tokens_decoder()
        named = {i for i in (bos_token_id, pad_token_id, unk_token_id, *self.eos_token_ids) if i is not None}
        self.all_special_ids: list[int] = sorted({i for i, t in added.items() if t.special} | named)
        self._piece_cache: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"

    # -- vocabulary -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding may be padded larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _tok(self, i: int | None) -> str | None:
        return None if i is None else self.backend.id_to_token(i)

    @property
    def bos_token(self) -> str | None:
        return self._tok(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._tok(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._tok(self.pad_token_id)

    @property
    def unk_token(self) -> str | None:
        return self._tok(self.unk_token_id)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        if isinstance(ids, (int, np.integer)):
            return self.backend.id_to_token(int(ids))
        return [self.backend.id_to_token(int(i)) for i in ids]

    # -- encode / decode --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)  # WordPiece-era cleanup; destructive for BPE, as transformers knows
        return text

    def id_to_piece_text(self, token_id: int) -> str:
        """Text of one token on its own, for logprob display (vLLM's `decoded_token`).

        Special tokens show as themselves; a SentencePiece word-start keeps its leading space (decode()
        would strip it as the first token); a lone byte of a multi-byte char shows as U+FFFD.
        """
        cached = self._piece_cache.get(token_id)
        if cached is None:
            cached = self.backend.decode([token_id], skip_special_tokens=False)
            piece = self.backend.id_to_token(token_id) or ""
            if self._is_spm and piece.startswith("▁") and not cached.startswith(" "):
                cached = " " + cached
            self._piece_cache[token_id] = cached
        return cached

    # -- chat -------------------------------------------------------------------------------------
    def _template_source(self, chat_template: str | None, tools: Any) -> str:
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if tools and "tool_use" in own:
                    return own["tool_use"]
                if "default" in own:
                    return own["default"]
                raise ValueError(f"model has several chat templates and none is 'default': {sorted(own)}; pick one")
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json / chat_template.jinja / "
                "the GGUF's tokenizer.chat_template); pass chat_template=... or use a completion prompt instead"
            )
        return own

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to a prompt string, as transformers' apply_chat_template(tokenize=False).

        `continue_final_message=True` leaves the last (assistant) message open for the model to continue;
        it implies add_generation_prompt=False.
        """
        source = self._template_source(chat_template, tools)
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = _prepare_messages(messages, flatten=not _OPENAI_CONTENT_RE.search(source))
        final_text: str | None = None
        if continue_final_message:
            add_generation_prompt = False
            # Mark the end of the final message, render, cut at the mark: this strips whatever the
            # template appends after a message (e.g. "<|im_end|>\n") without knowing the template.
            content = chat[-1].get("content")
            if isinstance(content, str):
                final_text = content
                chat[-1]["content"] = content + _CONTINUE_TAG
            elif isinstance(content, list):
                for part in reversed(content):
                    if isinstance(part, Mapping) and "text" in part:
                        final_text = part["text"]
                        chat[-1]["content"] = [*content]
                        chat[-1]["content"][content.index(part)] = {**part, "text": part["text"] + _CONTINUE_TAG}
                        break
            if final_text is None:
                raise ValueError("continue_final_message is set but the final message has no text to continue")
        # Templates read the special tokens by name (e.g. {{ bos_token }}); explicit kwargs win.
        special = {k: getattr(self, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special = {k: v for k, v in special.items() if v is not None}
        rendered = _compile_template(source).render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**special, **kwargs},
        )
        if final_text is not None:
            tag = _CONTINUE_TAG.strip()
            if tag not in rendered or final_text.strip() not in rendered:
                raise ValueError("continue_final_message: the chat template dropped part of the final message")
            loc = rendered.rindex(tag)
            # If the template trimmed the message (e.g. `| trim`), the space in our tag went too: trim the same way.
            kept_space = rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG
            rendered = rendered[:loc] if kept_space else rendered[:loc].rstrip()
        return rendered


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, same replacements in the same order
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")):
        text = text.replace(old, new)
    for piece in ("n't", "'m", "'s", "'ve", "'re"):
        text = text.replace(" " + piece, piece)
    return text


# --------------------------------------------------------------------------------------------------
# Incremental detokenization
# --------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas.

    A token may end inside a multi-byte UTF-8 character (byte-level BPE, SentencePiece byte fallback):
    its text is held back until the character completes, so no delta carries a spurious U+FFFD.
    SentencePiece's word-start "▁" becomes a space mid-stream, which decoding a token alone would strip;
    decoding against the preceding tokens gets it right. Uses tokenizers' Rust DecodeStream when present.
    """

    _CONTEXT = 6  # prompt tokens of left context: enough for any multi-token character

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        *,
        use_decode_stream: bool | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.token_ids: list[int] = []
        context = [int(i) for i in (prompt_token_ids or [])][-self._CONTEXT :]
        self._stream = None
        if use_decode_stream is None or use_decode_stream:
            try:
                from tokenizers.decoders import DecodeStream

                kw = {"ids": context} if context else {}  # prompt tail = left context, never emitted
                self._stream = DecodeStream(skip_special_tokens=skip_special_tokens, **kw)
            except (ImportError, TypeError):
                if use_decode_stream:
                    raise
        self._context = context
        # Prefix-offset fallback (vLLM's scheme): decode a short window, emit what grew past the prefix.
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self.tokenizer.backend, token_id) or ""
        else:
            delta = self._add_fallback(token_id)
        self.text += delta
        return delta

    def _add_fallback(self, token_id: int) -> str:
        self._ids.append(token_id)
        dec = self.tokenizer.backend.decode
        prefix = dec(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens)
        full = dec(self._ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""

    def finish(self) -> str:
        """Flush text held back at the end of the stream (an incomplete character decodes to U+FFFD)."""
        if not self.token_ids:
            return ""
        dec = self.tokenizer.backend.decode
        full = dec(self._context + self.token_ids, skip_special_tokens=self.skip_special_tokens)
        base = dec(self._context, skip_special_tokens=self.skip_special_tokens) if self._context else ""
        full = full[len(base) :] if full.startswith(base) else full
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
