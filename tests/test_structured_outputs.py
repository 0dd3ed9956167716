"""Structured outputs on the real default model: JSON schemas (validated with jsonschema), regex,
choice and grammars, greedy and sampled, batched with unconstrained requests, n > 1 and preemption;
the packed bitmask against its NumPy reference."""

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams, StructuredOutputsParams
from jaxllm.engine.sampler import RowSpec, SamplingTensors, sample
from jaxllm.engine.structured_output import unpack_mask

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["price"], "additionalProperties": False},
    {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city"],
     "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -50, "maximum": 50}, "y": {"type": "integer", "minimum": -50, "maximum": 50}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "boolean"},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 5}]},
    {"$defs": {"person": {"type": "object", "properties": {"name": NAME}, "required": ["name"],
                          "additionalProperties": False}},
     "type": "object", "properties": {"author": {"$ref": "#/$defs/person"}}, "required": ["author"],
     "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                                      "title": NAME, "done": {"type": "boolean"}},
     "required": ["id", "title", "done"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"}, "day": {"enum": ["mon", "tue", "wed"]}},
     "required": ["kind", "day"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 5}},
     "required": ["a"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
    {"type": "object", "properties": {"lang": {"enum": ["en", "fr", "de"]}, "words": {
        "type": "array", "items": NAME, "maxItems": 2}}, "required": ["lang", "words"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def smol():
    return LLM(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=512)


def chat_prompt(llm, text):
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template([{"role": "user", "content": text}])
    return {"prompt_token_ids": tok.encode(rendered, add_special_tokens=False)}


def test_json_schemas_always_validate_greedy_and_sampled_batched_with_free_text(smol):
    assert len(SCHEMAS) >= 20
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        for temperature in (0.0, 1.0):
            prompts.append(chat_prompt(smol, f"Reply with JSON matching this schema: {json.dumps(schema)}"))
            params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=160,
                                         structured_outputs=StructuredOutputsParams(json=schema)))
    for i in range(6):  # unconstrained neighbours in the same batches
        prompts.append(chat_prompt(smol, "Tell me a short story."))
        params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=40))
    outs = smol.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs[:len(SCHEMAS) * 2], params):
        comp = out.outputs[0]
        assert comp.finish_reason == "stop", (comp.text, p.structured_outputs.json)
        jsonschema.validate(json.loads(comp.text), p.structured_outputs.json)
    free = [o.outputs[0] for o in outs[len(SCHEMAS) * 2:]]
    assert all(len(c.token_ids) == 40 or c.finish_reason == "stop" for c in free)
    assert any(not c.text.lstrip().startswith(("{", "[")) for c in free)  # they were not constrained
    assert smol.engine.get_stats().num_recompiles_after_warmup == 0


def test_regex_choice_grammar_and_json_object(smol):
    cases = [
        (StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,2}"),
         lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,2}", t)),
        (StructuredOutputsParams(choice=["Paris", "London", "Rome"]), lambda t: t in ("Paris", "London", "Rome")),
        (StructuredOutputsParams(grammar='root ::= "(" num " " ("+" | "*") " " num ")"\nnum ::= [1-9] [0-9]?'),
         lambda t: re.fullmatch(r"\([1-9][0-9]? [+*] [1-9][0-9]?\)", t)),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    for temperature in (0.0, 0.9):
        outs = smol.generate([chat_prompt(smol, "Answer briefly: what is the capital of France?")] * len(cases),
                             [SamplingParams(temperature=temperature, seed=3, max_tokens=60, structured_outputs=so)
                              for so, _ in cases], use_tqdm=False)
        for out, (so, ok) in zip(outs, cases):
            assert out.outputs[0].finish_reason == "stop" and ok(out.outputs[0].text), (so, out.outputs[0].text)


def test_constrained_tokens_are_identical_alone_batched_with_n_and_under_preemption(smol):
    schema = SCHEMAS[0]
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=80, n=2,
                       structured_outputs=StructuredOutputsParams(json=schema))
    prompt = chat_prompt(smol, "Make up a person as JSON.")
    alone = smol.generate(prompt, p, use_tqdm=False)[0]
    noise = [chat_prompt(smol, f"Count to {i}.") for i in range(10)]
    batched = smol.generate([prompt, *noise], [p] + [SamplingParams(temperature=0.7, seed=i, max_tokens=50)
                                                  for i in range(10)], use_tqdm=False)[0]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in batched.outputs]
    for c in alone.outputs:
        jsonschema.validate(json.loads(c.text), schema)
    # no warm-up: this test counts no recompiles (see tests/test_engine.py)
    tight = LLM(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256, num_pages=14, warmup=False)
    squeezed = tight.generate([prompt, *noise[:6]], [p] + [SamplingParams(temperature=0.7, seed=i, max_tokens=50)
                                                         for i in range(6)], use_tqdm=False)[0]
    assert tight.engine.get_stats().num_preemptions_total > 0
    assert [c.token_ids for c in squeezed.outputs] == [c.token_ids for c in alone.outputs]


def test_invalid_specs_fail_at_add_naming_the_field(smol):
    eng = smol.engine
    bad = [(StructuredOutputsParams(regex="[a-"), "regex"), (StructuredOutputsParams(json={"type": "strin"}), "json"),
           (StructuredOutputsParams(grammar="root ::= ("), "grammar"),
           (StructuredOutputsParams(json={"type": "string", "format": "no-such-format"}), "json")]
    for so, field in bad:
        with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
            eng.add_request("bad", "hi", SamplingParams(structured_outputs=so))
    with pytest.raises(ValueError, match="uniqueItems"):  # an unsupported keyword is named, not ignored
        eng.add_request("bad", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(
            json={"type": "array", "uniqueItems": True})))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    assert not eng.has_unfinished_requests()


def test_packed_mask_matches_numpy_and_leaves_other_rows_alone():
    rng = np.random.default_rng(0)
    V, R = 70, 4
    words = rng.integers(-2**31, 2**31 - 1, size=(R, 3), dtype=np.int64).astype(np.int32)
    logits = rng.normal(0, 1, (R, V)).astype(np.float32)
    rows = [RowSpec(temperature=0.0, token_mask=words[i]) if i % 2 == 0 else RowSpec(temperature=0.0)
            for i in range(R)]
    out = sample(jnp.asarray(logits), SamplingTensors.build(rows, R=R))
    allowed = unpack_mask(words, V)
    for i in range(R):
        want = np.where(allowed[i], logits[i], -np.inf) if i % 2 == 0 else logits[i]
        assert int(out.token_ids[i]) == int(np.argmax(want))
    # The raw logprob of the chosen token is still the unmasked log-softmax.
    lse = np.log(np.exp(logits.astype(np.float64)).sum(1))
    np.testing.assert_allclose(out.token_logprob, logits[np.arange(R), out.token_ids] - lse, atol=1e-5)
