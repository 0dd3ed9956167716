"""Offline inference: `LLM(model).generate(prompts, params)` and `LLM.chat(conversations, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from jaxllm.config import EngineConfig
from jaxllm.engine.data_parallel import create_engine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """Runs many prompts through one engine with continuous batching; outputs come back in input order.

    `model=None` loads the embedded default (SmolLM2-135M-Instruct); other keyword arguments are engine
    flags with vLLM's names (max_num_seqs=..., max_model_len=..., kv_cache_memory=..., dtype=...,
    tensor_parallel_size=..., data_parallel_size=..., enable_expert_parallel=...; many hosts: nnodes=...,
    node_rank=..., master_addr=..., master_port=...). Many hosts run the same script: on rank 0 `LLM(...)`
    is the engine; on the other ranks it follows rank 0 and then exits the process (SystemExit) when
    rank 0 is done, so what comes after it only runs on rank 0.
    """

    def __init__(self, model: str | None = None, **engine_flags):
        config = EngineConfig.from_flags(model=model, **engine_flags)
        if config.parallel.follows_rank0:
            from jaxllm.engine.multihost import run_follower
            raise SystemExit(run_follower(config))
        self.engine = create_engine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, {"prompt": ...} / {"prompt_token_ids": [...]}, or a list of them."""
        prompts = _as_list(prompts)
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        # Only final outputs are returned: the engine then builds nothing per step.
        final = {}
        params = [final.setdefault(id(p), p.clone(output_kind=RequestOutputKind.FINAL_ONLY)) for p in params]
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = str(next(self._ids))
            text, token_ids = _split_prompt(prompt)
            self.engine.add_request(rid, text, p, prompt_token_ids=token_ids,
                                    priority=priority[i] if priority else 0)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template: str | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations, rendered with the model's template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            text = self.engine.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, chat_template=chat_template, tools=tools)
            # The template already holds BOS / special tokens: don't add them twice.
            prompts.append({"prompt": text, "prompt_token_ids": self.engine.tokenizer.encode(
                text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType], *, pooling: str | None = None,
              use_tqdm: bool = True) -> list:
        """Embeddings of the prompts (vLLM's shape: `out.outputs.embedding`): the L2-normalized final
        hidden state of the last token (`pooling="last"`, the default of --pooling) or the mean over
        all tokens (`"mean"`), computed by the same batched step as generation."""
        prompts = _as_list(prompts)
        ids = []
        for prompt in prompts:
            rid = str(next(self._ids))
            text, token_ids = _split_prompt(prompt)
            self.engine.add_request(rid, text, None, prompt_token_ids=token_ids, pooling=pooling or True)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params) -> list:
        """Beam search (vLLM's `LLM.beam_search(prompts, BeamSearchParams(beam_width, max_tokens))`):
        one `BeamSearchOutput` per prompt with its beam_width best sequences, best first."""
        from jaxllm.beam_search import BeamSearch, advance_all, live_beams
        prompts = _as_list(prompts)
        eng = self.engine
        searches = []
        for prompt in prompts:
            text, ids = _split_prompt(prompt)
            ids = ids if ids is not None else eng.tokenizer.encode(text)
            searches.append(BeamSearch(ids, params, eng.eos_token_ids, eng.max_model_len, eng.tokenizer))
        while beams := live_beams(searches):
            outs = self.generate([{"prompt_token_ids": t} for t in beams], searches[0].step_params(), use_tqdm=False)
            advance_all(searches, outs)
        return [s.result() for s in searches]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm or len(request_ids) < 2,
                   dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]


def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (a string, a dict, or a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        return prompt.get("prompt"), prompt.get("prompt_token_ids")
    return None, list(prompt)
