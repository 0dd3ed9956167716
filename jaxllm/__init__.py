"""jaxllm: a JAX/XLA-native LLM inference and serving engine."""

from jaxllm.config import EngineConfig
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "BeamSearchParams", "SamplingParams", "StructuredOutputsParams", "RequestOutputKind", "EngineConfig",
           "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name):
    # LLM / LLMEngine pull in JAX and the models; import them lazily so `import jaxllm` stays cheap.
    if name == "LLM":
        from jaxllm.llm import LLM
        return LLM
    if name == "BeamSearchParams":
        from jaxllm.beam_search import BeamSearchParams
        return BeamSearchParams
    if name == "LLMEngine":
        from jaxllm.engine.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
